"""The one place that decides between fused kernels and their PyTorch references.

Fused ops are torch custom ops (`supernet::mixed_sum`, `supernet::pool_candidates`, with fake
implementations and autograd formulas), so `torch.compile` traces through them without graph breaks.
On CUDA they launch the Triton kernels in `kernels/`; elsewhere they run the PyTorch references.
Per device, the fused path uses whichever variant measured fastest (bench/README.md has the figures).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_conv
from kernels.mixed_sum import common_dtype, mixed_sum_reference
from kernels.pool_candidates import fold_stats_grad, pool_candidates_reference, pool_stats_reference

try:  # Triton wheels exist for Linux only; without it every device runs the references.
    from kernels import mixed_sum as _mixed_sum_triton
    from kernels import pool_candidates as _pool_triton
except ImportError:  # pragma: no cover
    _mixed_sum_triton = _pool_triton = None

# How the fused path computes an edge's convolutional candidates, per device type:
#   "horizontal":  ReLU once; 3x3/5x5/dilated-3x3 depthwise stages as one 5x5 multiplier conv,
#                  pointwise stages as one grouped 1x1 conv, one batch norm over all channels.
#   "shared_relu": ReLU once; each candidate's convolutions run on their own.
# On the CPU the 5x5 footprint costs more than the calls it saves (bench/README.md). On CUDA it is not
# yet measured: bench/gpu_check.py times both, and this stays on the conservative choice until then.
CONV_FUSION = {"cpu": "shared_relu", "cuda": "shared_relu"}
POOLS = ("avg_pool_3x3", "max_pool_3x3")
# Whether the fused path takes the pools' training-mode batch-norm statistics from the pool kernel's own
# pass over x, per device type. On the CPU there is no kernel (the op runs PyTorch's pools and var_mean),
# and it measured about 2x slower than the two BatchNorm2d calls (bench/README.md).
POOL_BN_FUSION = {"cpu": False, "cuda": True}
# On the CPU a few candidates (GDAS, single-path) are summed faster by plain torch ops than through
# an autograd Function: gumbel steps ran 3-7% slower fused without this threshold (bench/README.md).
CPU_MIN_CANDIDATES = 6


# --- mixed_sum ----------------------------------------------------------------------------------
def _mixed_sum_cpu(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    # accumulate in place: no per-term temporaries, and autograd keeps none of them
    dtype = common_dtype(outputs)
    if weights is None:
        total = outputs[0].to(dtype, copy=True)
        for o in outputs[1:]:
            total.add_(o)
        return total
    total = outputs[0].to(dtype) * weights[0]
    for k in range(1, len(outputs)):
        total.addcmul_(outputs[k], weights[k])
    return total


def _mixed_sum_backward_cpu(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None, grad: torch.Tensor,
                            need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients of the candidates stacked as (K, *shape), gradient of the weights or an empty tensor)."""
    dtype = common_dtype(outputs)
    g = grad.to(dtype)
    k = len(outputs)
    if weights is None:
        grad_outputs = g.expand(k, *g.shape).clone()
    else:
        grad_outputs = weights.to(dtype).view(k, *([1] * g.dim())) * g
    if not (need_weight_grad and weights is not None):
        return grad_outputs, g.new_empty(0)
    acc = torch.promote_types(dtype, torch.float32)  # half precision sums in fp32
    flat_g = g.reshape(-1).to(acc)
    grad_weights = torch.stack([torch.dot(o.reshape(-1).to(acc), flat_g) for o in outputs]).to(weights.dtype)
    return grad_outputs, grad_weights


@torch.library.custom_op("supernet::mixed_sum", mutates_args=())
def _mixed_sum_op(outputs: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """sum_k weights[k] * outputs[k]: Triton on CUDA, in-place accumulation elsewhere."""
    return _mixed_sum_cpu(outputs, weights)


@_mixed_sum_op.register_fake
def _(outputs, weights):
    return outputs[0].new_empty(outputs[0].shape, dtype=common_dtype(outputs))


@torch.library.custom_op("supernet::mixed_sum_backward", mutates_args=())
def _mixed_sum_backward_op(outputs: list[torch.Tensor], weights: torch.Tensor | None, grad: torch.Tensor,
                           need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of mixed_sum as one op (on CUDA: one Triton launch and a finishing reduction)."""
    return _mixed_sum_backward_cpu(outputs, weights, grad, need_weight_grad)


@_mixed_sum_backward_op.register_fake
def _(outputs, weights, grad, need_weight_grad):
    dtype = common_dtype(outputs)
    k = len(outputs)
    grad_outputs = grad.new_empty((k, *grad.shape), dtype=dtype)
    if not (need_weight_grad and weights is not None):
        return grad_outputs, grad.new_empty(0, dtype=dtype)
    return grad_outputs, weights.new_empty((k,))


if _mixed_sum_triton is not None:
    @_mixed_sum_op.register_kernel("cuda")
    def _(outputs, weights):
        return _mixed_sum_triton.mixed_sum_forward(outputs, weights)

    @_mixed_sum_backward_op.register_kernel("cuda")
    def _(outputs, weights, grad, need_weight_grad):
        grad_outputs, grad_weights = _mixed_sum_triton.mixed_sum_backward(outputs, weights, grad, need_weight_grad)
        return grad_outputs, grad_weights if grad_weights is not None else grad.new_empty(0, dtype=grad_outputs.dtype)


def _mixed_sum_setup(ctx, inputs, output):
    outputs, weights = inputs
    ctx.num_outputs = len(outputs)
    ctx.dtypes = [o.dtype for o in outputs]
    ctx.need_weight_grad = weights is not None and weights.requires_grad
    ctx.save_for_backward(weights, *outputs)


def _mixed_sum_backward(ctx, grad):
    weights, *outputs = ctx.saved_tensors
    grad_outputs, grad_weights = _mixed_sum_backward_op(outputs, weights, grad, ctx.need_weight_grad)
    grads = [g.to(dtype) for g, dtype in zip(grad_outputs.unbind(0), ctx.dtypes)]
    return grads, grad_weights if ctx.need_weight_grad else None


_mixed_sum_op.register_autograd(_mixed_sum_backward, setup_context=_mixed_sum_setup)


class _MixedSumEager(torch.autograd.Function):
    """The CPU path outside torch.compile: the custom op's implementations without its per-call
    dispatch cost, which a search step pays tens of times."""

    @staticmethod
    def forward(ctx, weights, *outputs):
        ctx.need_weight_grad = weights is not None and ctx.needs_input_grad[0]
        ctx.save_for_backward(weights, *outputs)
        return _mixed_sum_cpu(outputs, weights)

    @staticmethod
    def backward(ctx, grad):
        weights, *outputs = ctx.saved_tensors
        grad_outputs, grad_weights = _mixed_sum_backward_cpu(outputs, weights, grad, ctx.need_weight_grad)
        grads = (g.to(o.dtype) for g, o in zip(grad_outputs.unbind(0), outputs))
        return (grad_weights if ctx.need_weight_grad else None, *grads)


def mixed_sum(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """sum_i weights[i] * outputs[i] (a plain sum when weights is None)."""
    if not fused or len(outputs) == 1 and weights is None:
        return mixed_sum_reference(outputs, weights)
    if outputs[0].is_cuda or torch.compiler.is_compiling():
        return _mixed_sum_op(list(outputs), weights)
    if len(outputs) < CPU_MIN_CANDIDATES:
        return mixed_sum_reference(outputs, weights)
    return _MixedSumEager.apply(weights, *outputs)


# --- parameter-free candidates ------------------------------------------------------------------
@torch.library.custom_op("supernet::pool_candidates", mutates_args=())
def _pool_op(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3x3 average pool without padding in the count, 3x3 max pool), padding 1."""
    return pool_candidates_reference(x, stride)


@_pool_op.register_fake
def _(x, stride):
    n, c, h, w = x.shape
    shape = (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("supernet::pool_candidates_backward", mutates_args=())
def _pool_backward_op(x: torch.Tensor, stride: int, grad_avg: torch.Tensor, grad_max: torch.Tensor) -> torch.Tensor:
    """dL/dx of both pools; the max pool's argmax is recomputed from x."""
    dx = torch.ops.aten.avg_pool2d_backward(grad_avg, x, [3, 3], [stride, stride], [1, 1], False, False, None)
    _, index = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [stride, stride], [1, 1])
    return dx + torch.ops.aten.max_pool2d_with_indices_backward(grad_max, x, [3, 3], [stride, stride], [1, 1],
                                                                 [1, 1], False, index)


@_pool_backward_op.register_fake
def _(x, stride, grad_avg, grad_max):
    return torch.empty_like(x)


if _pool_triton is not None:
    @_pool_op.register_kernel("cuda")
    def _(x, stride):
        return _pool_triton.pool_candidates_forward(x, stride)

    @_pool_backward_op.register_kernel("cuda")
    def _(x, stride, grad_avg, grad_max):
        return _pool_triton.pool_candidates_backward(x, stride, grad_avg, grad_max)


def _pool_setup(ctx, inputs, output):
    x, stride = inputs
    ctx.stride = stride
    ctx.save_for_backward(x)


def _pool_backward(ctx, grad_avg, grad_max):
    (x,) = ctx.saved_tensors
    grad_avg = grad_avg if grad_avg is not None else torch.zeros_like(x[..., ::ctx.stride, ::ctx.stride])
    grad_max = grad_max if grad_max is not None else torch.zeros_like(grad_avg)
    return _pool_backward_op(x, ctx.stride, grad_avg, grad_max), None


_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup)


@torch.library.custom_op("supernet::pool_candidates_stats", mutates_args=())
def _pool_stats_op(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(avg pool, max pool, mean, biased var), mean and var (2, C) in at least fp32: both pools' batch statistics."""
    return pool_stats_reference(x, stride)


@_pool_stats_op.register_fake
def _(x, stride):
    n, c, h, w = x.shape
    shape = (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty((2, c), dtype=acc), x.new_empty((2, c), dtype=acc)


if _pool_triton is not None:
    @_pool_stats_op.register_kernel("cuda")
    def _(x, stride):
        return _pool_triton.pool_stats_forward(x, stride)


def _pool_stats_setup(ctx, inputs, output):
    x, stride = inputs
    avg, mx, mean, _ = output
    ctx.stride = stride
    ctx.save_for_backward(x, avg, mx, mean)


def _pool_stats_backward(ctx, grad_avg, grad_max, grad_mean, grad_var):
    x, avg, mx, mean = ctx.saved_tensors
    pick = [(g[k] if g is not None else None) for k in (0, 1) for g in (grad_mean, grad_var)]
    grad_avg = fold_stats_grad(avg, mean[0], grad_avg, pick[0], pick[1])
    grad_max = fold_stats_grad(mx, mean[1], grad_max, pick[2], pick[3])
    grad_avg = grad_avg if grad_avg is not None else torch.zeros_like(avg)
    grad_max = grad_max if grad_max is not None else torch.zeros_like(mx)
    return _pool_backward_op(x, ctx.stride, grad_avg, grad_max), None


_pool_stats_op.register_autograd(_pool_stats_backward, setup_context=_pool_stats_setup)


def batch_norm_with_stats(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """A non-affine BatchNorm2d in training mode applied to y, given y's batch mean and biased variance.

    Updates bn's running statistics as nn.BatchNorm2d does (unbiased variance, momentum or cumulative).
    """
    if bn.affine or not (bn.training or not bn.track_running_stats):
        raise ValueError(f"batch_norm_with_stats expects a non-affine batch norm using batch statistics, got {bn}")
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        count = y.numel() // y.shape[1]
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
            unbiased = var.detach().to(bn.running_var.dtype) * (count / (count - 1))
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    shift = mean.view(1, -1, 1, 1)
    scale = torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
    acc = torch.promote_types(y.dtype, torch.float32)  # half precision normalises in fp32
    return ((y.to(acc) - shift) * scale).to(y.dtype)


def _pool_batch_norms(ops: nn.ModuleDict, x: torch.Tensor) -> list[nn.BatchNorm2d] | None:
    """The two pools' batch norms when the fused statistics apply to them here; else None."""
    if not POOL_BN_FUSION.get(x.device.type, False):
        return None
    bns = [op[1] if isinstance(op, nn.Sequential) and len(op) == 2 else None for op in (ops[p] for p in POOLS)]
    if not all(isinstance(bn, nn.BatchNorm2d) and not bn.affine and (bn.training or not bn.track_running_stats)
               for bn in bns):
        return None
    n, _, h, w = x.shape
    stride = _pool_stride(ops[POOLS[0]])
    if n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) < 2:
        return None  # one value per channel: leave it to BatchNorm2d, which refuses it
    return bns


def pool_candidates(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(avg pool, max pool) of x: one fused kernel on CUDA, the PyTorch pools elsewhere (faster there)."""
    if x.is_cuda:
        return _pool_op(x, stride)
    return pool_candidates_reference(x, stride)


# --- one edge's candidates ----------------------------------------------------------------------
def batch_norm_concat(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """Several batch norms over their concatenated channels in one call, updating each one's statistics.

    Exact, since batch norm is per channel. Falls back to one call per module when they differ in
    mode or settings.
    """
    first = bns[0]
    sizes = [bn.num_features for bn in bns]
    same = all(bn.training == first.training and bn.momentum == first.momentum and bn.eps == first.eps
               and bn.affine == first.affine and bn.track_running_stats == first.track_running_stats
               for bn in bns)
    if same and first.momentum is None and first.training and first.track_running_stats:
        same = all(bool(bn.num_batches_tracked == first.num_batches_tracked) for bn in bns)
    if len(bns) == 1 or not same:
        return torch.cat([bn(c) for bn, c in zip(bns, y.split(sizes, dim=1))], dim=1)
    # As nn.BatchNorm2d.forward does: count the batch, pick the averaging factor, use batch statistics
    # in training (or when no running statistics are kept).
    factor = 0.0 if first.momentum is None else first.momentum
    if first.training and first.track_running_stats:
        for bn in bns:
            bn.num_batches_tracked.add_(1)
        if first.momentum is None:
            factor = 1.0 / float(first.num_batches_tracked)
    use_batch_stats = first.training or not first.track_running_stats
    mean = torch.cat([bn.running_mean for bn in bns]) if first.track_running_stats else None
    var = torch.cat([bn.running_var for bn in bns]) if first.track_running_stats else None
    weight = torch.cat([bn.weight for bn in bns]) if first.affine else None
    bias = torch.cat([bn.bias for bn in bns]) if first.affine else None
    out = F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, first.eps)
    if first.track_running_stats and first.training:
        with torch.no_grad():
            for bn, m, v in zip(bns, mean.split(sizes), var.split(sizes)):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
    return out


def _relu_tail(op: nn.Module) -> list[nn.Module] | None:
    """The layers after a candidate's leading ReLU, or None when it does not start with one."""
    seq = op.op if isinstance(getattr(op, "op", None), nn.Sequential) else op
    if isinstance(seq, nn.Sequential) and len(seq) > 1 and isinstance(seq[0], nn.ReLU):
        return list(seq)[1:]
    return None


def _is_depthwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and conv.bias is None and conv.kernel_size[0] == conv.kernel_size[1]
            and fused_conv.span(conv.kernel_size[0], conv.dilation[0]) <= fused_conv.FOOTPRINT
            and conv.dilation[0] == conv.dilation[1] and conv.stride[0] == conv.stride[1]
            and conv.padding == (conv.dilation[0] * (conv.kernel_size[0] - 1) // 2,) * 2)


def _is_pointwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.bias is None \
        and conv.stride == (1, 1)


def _horizontal_stages(tail: list[nn.Module]) -> list[tuple[nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]] | None:
    """A tail made of (depthwise, pointwise, BN) stages joined by ReLUs, as a list of stages; else None."""
    stages, i = [], 0
    while i < len(tail):
        if i and isinstance(tail[i], nn.ReLU):
            i += 1
        dw, pw, bn = (tail[i: i + 3] + [None, None, None])[:3]
        if not (_is_depthwise(dw) and _is_pointwise(pw) and isinstance(bn, nn.BatchNorm2d)):
            return None
        if stages and dw.stride[0] != 1:
            return None
        stages.append((dw, pw, bn))
        i += 3
    return stages or None


def _horizontal(r: torch.Tensor, stage_lists: list[list[tuple]]) -> list[torch.Tensor]:
    """Runs candidates made of depthwise-pointwise-BN stages (ReLU in between) side by side."""
    stride = stage_lists[0][0][0].stride[0]
    first = [stages[0] for stages in stage_lists]
    y = fused_conv.depthwise_pointwise_fused(r, [dw.weight for dw, _, _ in first], [dw.dilation[0] for dw, _, _ in first],
                                             [pw.weight for _, pw, _ in first], stride)
    y = batch_norm_concat(y, [bn for _, _, bn in first])
    results = list(y.split([bn.num_features for _, _, bn in first], dim=1))
    depth = 1
    while True:
        # candidates are ordered deepest first, so the ones that go on are a channel prefix of y
        deeper = [j for j, stages in enumerate(stage_lists) if len(stages) > depth]
        if not deeper:
            return results
        stage = [stage_lists[j][depth] for j in deeper]
        prefix = sum(results[j].shape[1] for j in deeper)
        y = fused_conv.grouped_depthwise_pointwise(torch.relu(y[:, :prefix]), [dw.weight for dw, _, _ in stage],
                                                   [dw.dilation[0] for dw, _, _ in stage],
                                                   [pw.weight for _, pw, _ in stage])
        y = batch_norm_concat(y, [bn for _, _, bn in stage])
        for j, out in zip(deeper, y.split([bn.num_features for _, _, bn in stage], dim=1)):
            results[j] = out
        depth += 1


def edge_outputs(ops: nn.ModuleDict, x: torch.Tensor, names: Sequence[str], fused: bool = False) -> list[torch.Tensor]:
    """The outputs of an edge's candidates `names` on x, in that order.

    Fused: both pools come from one pass over x (on CUDA with their batch-norm statistics); every
    candidate that starts with a ReLU shares one ReLU(x); convolutional candidates run side by side
    where the device's CONV_FUSION says so.
    """
    if not fused or len(names) == 1:
        return [ops[name](x) for name in names]
    out: dict[str, torch.Tensor] = {}
    bns = _pool_batch_norms(ops, x) if all(p in names for p in POOLS) else None
    if bns is not None:
        # one pass over x gives both pools and their batch statistics; only the normalisation remains
        avg, mx, mean, var = _pool_stats_op(x, _pool_stride(ops[POOLS[0]]))
        for k, (name, y) in enumerate(zip(POOLS, (avg, mx))):
            out[name] = batch_norm_with_stats(y, mean[k], var[k], bns[k])
    elif all(p in names for p in POOLS):
        avg, mx = pool_candidates(x, _pool_stride(ops[POOLS[0]]))
        for name, y in zip(POOLS, (avg, mx)):
            op = ops[name]
            out[name] = op[1](y) if isinstance(op, nn.Sequential) else y  # the pool's batch norm, if any
    tails = {name: _relu_tail(ops[name]) for name in names if name not in out}
    r = torch.relu(x) if any(t is not None for t in tails.values()) else None
    if CONV_FUSION.get(x.device.type, "shared_relu") == "horizontal":
        stages = {name: _horizontal_stages(t) for name, t in tails.items() if t is not None}
        group = [name for name, s in stages.items() if s is not None]
        if len(group) > 1:
            group.sort(key=lambda name: -len(stages[name]))
            out.update(zip(group, _horizontal(r, [stages[name] for name in group])))
    for name in names:
        if name in out:
            continue
        tail = tails[name]
        if tail is None:
            out[name] = ops[name](x)
        else:
            y = r
            for layer in tail:
                y = layer(y)
            out[name] = y
    return [out[name] for name in names]


def _pool_stride(op: nn.Module) -> int:
    pool = op[0] if isinstance(op, nn.Sequential) else op
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    return int(stride)


def group_by_edge(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Consecutive (edge, op) pairs of one edge, as (edge, [ops]); order is kept."""
    return [(e, [k for _, k in group]) for e, group in itertools.groupby(pairs, key=lambda p: p[0])]
