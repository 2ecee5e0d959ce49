"""Which implementation a kernel's custom op runs: Triton on CUDA; on the CPU its own PyTorch code."""

from __future__ import annotations

import torch

# Tests on a machine without a GPU set this (under TRITON_INTERPRET=1, Triton's interpreter): CPU tensors
# then run the Triton kernels through the same custom op and autograd wrapper the GPU runs.
TRITON_ON_CPU = False


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the custom ops run their Triton kernels for tensors like x."""
    return x.is_cuda or TRITON_ON_CPU
