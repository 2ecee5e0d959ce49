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
        factor = count_batch(bn)
        update_running_stats(bn, mean, unbiased_variance(var.detach().to(bn.running_var.dtype), y), factor)
    shift = per_channel(mean)
    scale = per_channel(torch.rsqrt(var + bn.eps))
    acc = torch.promote_types(y.dtype, torch.float32)  # half precision normalises in fp32
    return ((y.to(acc) - shift) * scale).to(y.dtype)


def unbiased_variance(biased: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bessel's correction of y's per-channel biased variance: what running statistics average."""
    count = y.numel() // y.shape[1]
    return biased * (count / (count - 1))


def count_batch(bn: nn.BatchNorm2d) -> float:
    """Counts the batch and returns the running-average factor, as nn.BatchNorm2d.forward does."""
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return 0.0 if bn.momentum is None else bn.momentum


def count_batches(bns: list[nn.BatchNorm2d]) -> float:
    """`count_batch` for batch norms of the same momentum (not None), counted in one call; their factor."""
    first = bns[0]
    if first.training and first.track_running_stats:
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return first.momentum


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor, factor: float) -> None:
    """Moves bn's running statistics toward a batch's mean and unbiased variance by `factor` (if it keeps any)."""
    if bn.running_mean is not None:
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)


@torch.no_grad()
def update_running_stats_of(bns: list[nn.BatchNorm2d], mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """Counts the batch in each of `bns` and moves their running statistics toward the same batch statistics:
    one foreach call per statistic where they share a momentum (not None) and all keep statistics, else one by
    one (a cumulative average's factor is each module's own)."""
    first = bns[0]
    if first.momentum is None or not all(bn.momentum == first.momentum and bn.running_mean is not None for bn in bns):
        for bn in bns:
            update_running_stats(bn, mean, unbiased_var, count_batch(bn))
        return
    factor = count_batches(bns)
    running = [bn.running_mean for bn in bns] + [bn.running_var for bn in bns]
    torch._foreach_mul_(running, 1 - factor)
    torch._foreach_add_(running, [mean] * len(bns) + [unbiased_var] * len(bns), alpha=factor)


def uses_batch_stats_only(bn: nn.Module) -> bool:
    """Whether bn is a non-affine BatchNorm2d that normalises with the batch's own statistics."""
    return (isinstance(bn, nn.BatchNorm2d) and not bn.affine
            and (bn.training or not bn.track_running_stats))
