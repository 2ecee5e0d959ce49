"""Batch-norm maths the fused path needs beyond nn.BatchNorm2d: normalising with statistics computed elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from kernels.pool_candidates import per_channel


def batch_norm_with_stats(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """A non-affine BatchNorm2d in training mode applied to y, given y's batch mean and biased variance.

    Updates bn's running statistics as nn.BatchNorm2d does (unbiased variance, momentum or cumulative).
    """
    if not uses_batch_stats_only(bn):
        raise ValueError(f"batch_norm_with_stats expects a non-affine batch norm using batch statistics, got {bn}")
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        count = y.numel() // y.shape[1]
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
            unbiased = var.detach().to(bn.running_var.dtype) * (count / (count - 1))
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    shift = per_channel(mean)
    scale = per_channel(torch.rsqrt(var + bn.eps))
    acc = torch.promote_types(y.dtype, torch.float32)  # half precision normalises in fp32
    return ((y.to(acc) - shift) * scale).to(y.dtype)


def uses_batch_stats_only(bn: nn.Module) -> bool:
    """Whether bn is a non-affine BatchNorm2d that normalises with the batch's own statistics."""
    return (isinstance(bn, nn.BatchNorm2d) and not bn.affine
            and (bn.training or not bn.track_running_stats))
