"""Interoperability with the state_dict layouts of reference implementations."""
