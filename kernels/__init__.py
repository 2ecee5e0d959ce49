"""Fused Triton kernels for mixed operations, each with a PyTorch reference (the test oracle and CPU path)."""
