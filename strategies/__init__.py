"""Strategies that sample subnetworks from a trained supernet or a tabular benchmark."""
