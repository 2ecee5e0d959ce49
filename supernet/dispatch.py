"""The one place that decides, per device, between the fused kernels and the plain PyTorch path.

The kernels and their autograd wrappers live in `kernels/` (torch custom ops with fake implementations,
so `torch.compile` traces through them without graph breaks: Triton on CUDA, their own PyTorch code on
the CPU). Here: which of them an edge uses, and how an edge's candidates share work, read from the
stages the candidates declare (`supernet.ops`). bench/README.md has the measurements behind each choice.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from kernels.mixed_sum import mixed_sum_reference
from kernels.pool_candidates import pool_candidates_reference

from .batch_norm import batch_norm_with_stats, uses_batch_stats_only
from .ops import StartsWithReLU, pool_parts

try:  # Triton wheels exist for Linux only; without it every device runs the plain PyTorch path.
    from kernels import backend
    from kernels import mixed_sum as mixed_sum_kernel
    from kernels import pool_candidates as pool_kernel
except ImportError:  # pragma: no cover
    backend = mixed_sum_kernel = pool_kernel = None

POOLS = ("avg_pool_3x3", "max_pool_3x3")
# Whether the fused path takes the pools' training-mode batch-norm statistics from the pool kernel's own
# pass over x, per device type. On the CPU there is no kernel (the op runs PyTorch's pools and var_mean),
# and it measured about 2x slower than the two BatchNorm2d calls (bench/README.md).
POOL_BN_FUSION = {"cpu": False, "cuda": True}
# On the CPU a few candidates (GDAS, single-path) are summed faster by plain torch ops than through
# an autograd Function: gumbel steps ran 3-7% slower fused without this threshold (bench/README.md).
CPU_MIN_CANDIDATES = 6


def _kernels_run(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like x (CUDA, or tests that interpret them on the CPU)."""
    return backend is not None and backend.uses_triton(x)


def mixed_sum(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """sum_i weights[i] * outputs[i] (a plain sum when weights is None)."""
    if not fused or mixed_sum_kernel is None or len(outputs) == 1 and weights is None:
        return mixed_sum_reference(outputs, weights)
    few = len(outputs) < CPU_MIN_CANDIDATES
    if few and not (_kernels_run(outputs[0]) or torch.compiler.is_compiling()):
        return mixed_sum_reference(outputs, weights)
    return mixed_sum_kernel.mixed_sum(outputs, weights)


def _pools(ops: nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both pool candidates' outputs from one pass over x (on CUDA with their batch-norm statistics)."""
    (avg_pool, avg_bn), (max_pool, max_bn) = (pool_parts(ops[name]) for name in POOLS)
    stride = avg_pool.stride if isinstance(avg_pool.stride, int) else avg_pool.stride[0]
    if not _kernels_run(x):  # on the CPU PyTorch's pools are faster than one op computing both
        pooled = pool_candidates_reference(x, stride)
        return {name: (bn(y) if bn is not None else y) for name, y, bn in zip(POOLS, pooled, (avg_bn, max_bn))}
    n, _, h, w = x.shape
    values_per_channel = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    fuse_bn = (POOL_BN_FUSION.get(x.device.type, False) and uses_batch_stats_only(avg_bn)
               and uses_batch_stats_only(max_bn) and values_per_channel > 1)  # BatchNorm2d refuses one value
    if fuse_bn:
        avg, mx, mean, var = pool_kernel.pool_stats(x, stride)
        return {POOLS[0]: batch_norm_with_stats(avg, mean[0], var[0], avg_bn),
                POOLS[1]: batch_norm_with_stats(mx, mean[1], var[1], max_bn)}
    pooled = pool_kernel.pool_candidates(x, stride)
    return {name: (bn(y) if bn is not None else y) for name, y, bn in zip(POOLS, pooled, (avg_bn, max_bn))}


def edge_outputs(ops: nn.ModuleDict, x: torch.Tensor, names: Sequence[str], fused: bool = False) -> list[torch.Tensor]:
    """The outputs of an edge's candidates `names` on x, in that order.

    Fused: both pools come from one pass over x, and every candidate that starts with a ReLU
    (`ops.StartsWithReLU`) shares one ReLU(x).
    """
    if not fused or len(names) == 1:
        return [ops[name](x) for name in names]
    out = _pools(ops, x) if all(p in names for p in POOLS) else {}
    rectified = None
    for name in names:
        if name in out:
            continue
        op = ops[name]
        if isinstance(op, StartsWithReLU):
            rectified = torch.relu(x) if rectified is None else rectified
            out[name] = op.after_relu(rectified)
        else:
            out[name] = op(x)
    return [out[name] for name in names]


def group_by_edge(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Consecutive (edge, op) pairs of one edge, as (edge, [ops]); order is kept."""
    return [(e, [k for _, k in group]) for e, group in itertools.groupby(pairs, key=lambda p: p[0])]
