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


def _prepared(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None):
    if len(outputs) == 0:
        raise ValueError("mixed_sum needs at least one candidate output, got an empty list")
    shape = outputs[0].shape
    for k, o in enumerate(outputs):
        if o.shape != shape:
            raise ValueError(f"mixed_sum candidate {k} has shape {tuple(o.shape)}; expected {tuple(shape)}")
    if weights is not None and weights.shape != (len(outputs),):
        raise ValueError(f"mixed_sum weights have shape {tuple(weights.shape)}; expected ({len(outputs)},)")
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


class MixedSum(torch.autograd.Function):
    """Autograd over the Triton kernels (tests and benchmarks; the network goes through dispatch)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor | None, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, *outputs)
        return mixed_sum_forward(outputs, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, *outputs = ctx.saved_tensors
        grad_outputs, grad_weights = mixed_sum_backward(outputs, weights, grad, ctx.needs_input_grad[0])
        return (grad_weights, *(go.to(o.dtype) for go, o in zip(grad_outputs, outputs)))


def mixed_sum_triton(outputs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """Differentiable Triton mixed sum."""
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
