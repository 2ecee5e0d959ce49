"""mixed_sum: a node's output, sum over candidates k of w[k] * o_k, in one launch forward and backward.

Math (o_k: the K candidate outputs of one node, flattened to N elements; w: K weights; g = dL/dout):
    out[n]    = sum_k w[k] * o_k[n]
    dL/do_k   = w[k] * g                        (elementwise, written by the same program that reads g)
    dL/dw[k]  = sum_n g[n] * o_k[n]             (a reduction: per-program partial sums into a (K, P)
                                                 buffer, then a finishing kernel; the layer-norm pattern)
With w = None the sum is unweighted. Hard one-hot weights (GDAS) are ordinary weights here: their
straight-through gradient lives in how w was built, so nothing leaves the device.
The K candidates are passed as a table of addresses, so they are read in place (no stacking copy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import backend
from ._alloc import empty

# Elements per program. Large blocks amortise the K address loads; not yet tuned on a GPU:
# bench/gpu_check.py reports the bandwidth these reach.
BLOCK_LARGE = 4096
BLOCK_SMALL = 1024
LARGE_N = 1 << 20
BLOCK_FINISH = 1024  # partial sums reduced per step by the finishing kernel


def mixed_sum_reference(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """sum_k weights[k] * outputs[k] in plain PyTorch (a plain sum when weights is None)."""
    if weights is None:
        total = outputs[0]
        for o in outputs[1:]:
            total = total + o
        return total
    total = weights[0] * outputs[0]
    for k in range(1, len(outputs)):
        total = total + weights[k] * outputs[k]
    return total


@triton.jit
def _mixed_sum_fwd_kernel(
    table_ptr,  # *i64 [K]: address of each candidate output, each [N] contiguous
    like_ptr,  # the first candidate: gives the element type the addresses point to
    w_ptr,  # [K] weights (unused without HAS_WEIGHTS)
    out_ptr,  # [N]
    N,  # elements per candidate
    K,  # number of candidates
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        p_o = tl.load(table_ptr + k).to(tl.pointer_type(like_ptr.dtype.element_ty))
        b_o = tl.load(p_o + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK]
        if HAS_WEIGHTS:
            b_acc += tl.load(w_ptr + k).to(tl.float32) * b_o
        else:
            b_acc += b_o
    tl.store(out_ptr + o_n, b_acc.to(out_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _mixed_sum_bwd_kernel(
    table_ptr,  # *i64 [K]: address of each candidate output
    like_ptr,  # the first candidate, for its element type
    w_ptr,  # [K] weights (unused without HAS_WEIGHTS)
    g_ptr,  # [N] gradient of the node output
    grad_o_ptr,  # [K, N] gradients of the candidates
    partial_ptr,  # [K, P] fp32 partial sums of g * o_k, one column per program
    N,  # elements per candidate
    K,  # number of candidates
    P,  # number of programs
    HAS_WEIGHTS: tl.constexpr,
    NEED_W_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_n = o_n < N
    b_g = tl.load(g_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK]
    for k in range(K):
        i_k = tl.full([], k, tl.int64)
        if HAS_WEIGHTS:
            b_go = tl.load(w_ptr + k).to(tl.float32) * b_g
        else:
            b_go = b_g
        tl.store(grad_o_ptr + i_k * N + o_n, b_go.to(grad_o_ptr.dtype.element_ty), mask=m_n)
        if NEED_W_GRAD:
            p_o = tl.load(table_ptr + k).to(tl.pointer_type(like_ptr.dtype.element_ty))
            b_o = tl.load(p_o + o_n, mask=m_n, other=0.0).to(tl.float32)
            tl.store(partial_ptr + i_k * P + i_n, tl.sum(b_g * b_o, axis=0))


@triton.jit
def _mixed_sum_wgrad_finish_kernel(
    partial_ptr,  # [K, P] fp32 partial sums
    dw_ptr,  # [K] weight gradients
    P,  # partial sums per candidate
    BLOCK_P: tl.constexpr,
):
    i_k = tl.program_id(0).to(tl.int64)
    b_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        o_p = start + tl.arange(0, BLOCK_P)
        b_acc += tl.load(partial_ptr + i_k * P + o_p, mask=o_p < P, other=0.0)
    tl.store(dw_ptr + i_k, tl.sum(b_acc, axis=0).to(dw_ptr.dtype.element_ty))


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for n elements per candidate."""
    return (BLOCK_LARGE, 8) if n >= LARGE_N else (BLOCK_SMALL, 4)


def common_dtype(outputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the reference sum has (weights are 0-d per term, so they never promote it)."""
    return functools.reduce(torch.promote_types, (o.dtype for o in outputs))


def _check(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> None:
    if len(outputs) == 0:
        raise ValueError("mixed_sum needs at least one candidate output, got an empty list")
    shape = outputs[0].shape
    for k, o in enumerate(outputs):
        if o.shape != shape:
            raise ValueError(f"mixed_sum candidate {k} has shape {tuple(o.shape)}; expected {tuple(shape)}")
    if weights is not None and weights.shape != (len(outputs),):
        raise ValueError(f"mixed_sum weights have shape {tuple(weights.shape)}; expected ({len(outputs)},)")


def _prepared(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None):
    _check(outputs, weights)
    shape = outputs[0].shape
    dtype = common_dtype(outputs)
    flat = [o.to(dtype).contiguous().view(-1) for o in outputs]
    table = torch.tensor([o.data_ptr() for o in flat], dtype=torch.int64)
    if flat[0].is_cuda:  # pinned and non-blocking: a pageable copy would wait for the stream (a host sync)
        table = table.pin_memory().to(flat[0].device, non_blocking=True)
    w = weights.contiguous() if weights is not None else flat[0]  # a placeholder pointer when unweighted
    return flat, table, w, shape, dtype


def mixed_sum_forward(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """The Triton forward: sum_k weights[k] * outputs[k], accumulated in fp32."""
    flat, table, w, shape, dtype = _prepared(outputs, weights)
    n = flat[0].numel()
    out = empty(shape, dtype, flat[0].device)
    block, warps = _launch_config(n)
    grid = (triton.cdiv(n, block),)
    _mixed_sum_fwd_kernel[grid](table, flat[0], w, out, n, len(flat), HAS_WEIGHTS=weights is not None,
                                BLOCK=block, num_warps=warps)
    return out


def mixed_sum_backward(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None, grad: torch.Tensor,
                       need_weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton backward: (gradients of the candidates stacked as (K, *shape), gradient of weights)."""
    flat, table, w, shape, dtype = _prepared(outputs, weights)
    n, k = flat[0].numel(), len(flat)
    g = grad.to(dtype).contiguous()
    need_weight_grad = need_weight_grad and weights is not None
    block, warps = _launch_config(n)
    programs = triton.cdiv(n, block)
    grad_outputs = empty((k, *shape), dtype, g.device)
    partial = empty((k, programs), torch.float32, g.device) if need_weight_grad else g
    _mixed_sum_bwd_kernel[(programs,)](table, flat[0], w, g, grad_outputs, partial, n, k, programs,
                                       HAS_WEIGHTS=weights is not None, NEED_W_GRAD=need_weight_grad,
                                       BLOCK=block, num_warps=warps)
    if not need_weight_grad:
        return grad_outputs, None
    grad_weights = empty((k,), weights.dtype, g.device)
    _mixed_sum_wgrad_finish_kernel[(k,)](partial, grad_weights, programs, BLOCK_P=BLOCK_FINISH, num_warps=4)
    return grad_outputs, grad_weights


def mixed_sum_cpu_forward(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """The CPU forward: accumulates in place, so there are no per-term temporaries for autograd to keep."""
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


def mixed_sum_cpu_backward(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None, grad: torch.Tensor,
                           need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU backward: (gradients of the candidates stacked as (K, *shape), weight gradient or an empty tensor)."""
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


# --- the custom ops (what torch.compile traces) and the one autograd wrapper over them ---------------
@torch.library.custom_op("supernet::mixed_sum", mutates_args=())
def mixed_sum_op(outputs: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """sum_k weights[k] * outputs[k]: the Triton kernel on CUDA, the in-place accumulation on the CPU."""
    if backend.uses_triton(outputs[0]):
        return mixed_sum_forward(outputs, weights)
    return mixed_sum_cpu_forward(outputs, weights)


@mixed_sum_op.register_fake
def _(outputs, weights):
    return outputs[0].new_empty(outputs[0].shape, dtype=common_dtype(outputs))


@torch.library.custom_op("supernet::mixed_sum_backward", mutates_args=())
def mixed_sum_backward_op(outputs: list[torch.Tensor], weights: torch.Tensor | None, grad: torch.Tensor,
                          need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of mixed_sum as one op: (candidate gradients (K, *shape), weight gradient or empty)."""
    if backend.uses_triton(outputs[0]):
        grad_outputs, grad_weights = mixed_sum_backward(outputs, weights, grad, need_weight_grad)
        return grad_outputs, grad_weights if grad_weights is not None else grad.new_empty(0, dtype=grad_outputs.dtype)
    return mixed_sum_cpu_backward(outputs, weights, grad, need_weight_grad)


@mixed_sum_backward_op.register_fake
def _(outputs, weights, grad, need_weight_grad):
    dtype = common_dtype(outputs)
    k = len(outputs)
    grad_outputs = grad.new_empty((k, *grad.shape), dtype=dtype)
    if not (need_weight_grad and weights is not None):
        return grad_outputs, grad.new_empty(0, dtype=dtype)
    return grad_outputs, weights.new_empty((k,))


def _direct(x: torch.Tensor) -> bool:
    """Eager CPU calls skip the custom op's dispatch, which costs more than the sum at search sizes."""
    return not (backend.uses_triton(x) or torch.compiler.is_compiling())


class MixedSum(torch.autograd.Function):
    """The autograd wrapper of mixed_sum: the network and the tests call it through `mixed_sum`."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor | None, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.need_weight_grad = weights is not None and ctx.needs_input_grad[0]
        ctx.save_for_backward(weights, *outputs)
        if _direct(outputs[0]):
            return mixed_sum_cpu_forward(outputs, weights)
        return mixed_sum_op(list(outputs), weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, *outputs = ctx.saved_tensors
        if _direct(outputs[0]):
            grad_outputs, grad_weights = mixed_sum_cpu_backward(outputs, weights, grad, ctx.need_weight_grad)
        else:
            grad_outputs, grad_weights = mixed_sum_backward_op(outputs, weights, grad, ctx.need_weight_grad)
        grads = (g.to(o.dtype) for g, o in zip(grad_outputs.unbind(0), outputs))
        return (grad_weights if ctx.need_weight_grad else None, *grads)


def mixed_sum(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """Differentiable sum_k weights[k] * outputs[k] (a plain sum when weights is None), accumulated in fp32."""
    _check(outputs, weights)
    return MixedSum.apply(weights, *outputs)


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for every kernel here, for ahead-of-time compile checks."""
    specs = []  # fp32 both ways, bf16 weighted (fp16 takes the same code path as bf16)
    for dtype, has_w in (("fp32", True), ("fp32", False), ("bf16", True)):
        specs.append((_mixed_sum_fwd_kernel,
                      {"table_ptr": "*i64", "like_ptr": f"*{dtype}", "w_ptr": "*fp32", "out_ptr": f"*{dtype}",
                       "N": "i32", "K": "i32", "HAS_WEIGHTS": "constexpr", "BLOCK": "constexpr"},
                      {"HAS_WEIGHTS": has_w, "BLOCK": BLOCK_LARGE}))
        specs.append((_mixed_sum_bwd_kernel,
                      {"table_ptr": "*i64", "like_ptr": f"*{dtype}", "w_ptr": "*fp32", "g_ptr": f"*{dtype}",
                       "grad_o_ptr": f"*{dtype}", "partial_ptr": "*fp32", "N": "i64", "K": "i32", "P": "i32",
                       "HAS_WEIGHTS": "constexpr", "NEED_W_GRAD": "constexpr", "BLOCK": "constexpr"},
                      {"HAS_WEIGHTS": has_w, "NEED_W_GRAD": has_w, "BLOCK": BLOCK_SMALL}))
    specs.append((_mixed_sum_wgrad_finish_kernel, {"partial_ptr": "*fp32", "dw_ptr": "*fp32", "P": "i32",
                                                   "BLOCK_P": "constexpr"}, {"BLOCK_P": BLOCK_FINISH}))
    return specs
