"""pool_candidates: 3x3 average pooling (padding not counted) and 3x3 max pooling in one pass over x.

Math, for an output position (i, j) with stride s and padding 1, over the window
W(i, j) = {(s*i - 1 + a, s*j - 1 + b) : a, b in 0..2} clipped to the image:
    avg[i, j] = sum_{W} x / |W|           max[i, j] = x[argmax_{W} x]
    dL/dx[p]  = sum_{(i, j): p in W(i, j)} g_avg[i, j] / |W(i, j)|
              + sum_{(i, j): argmax W(i, j) = p} g_max[i, j]
The backward gathers, per input element, over the at most 9 windows that contain it, and recomputes
each window's argmax rather than saving it (first maximum in scan order, a NaN wins, as PyTorch does).
Gathering instead of scattering keeps the sum order fixed, so results are deterministic.
The skip candidate (identity at stride 1) and the batch norm after pools are not here: they are
exact torch ops that the caller applies to these outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._alloc import empty

BLOCK = 256  # output elements per program; small images (8-32 a side) keep programs busy


def pool_candidates_reference(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3x3 average pool without counting padding, 3x3 max pool), both padding 1, in PyTorch."""
    avg = F.avg_pool2d(x, 3, stride, padding=1, count_include_pad=False)
    mx = F.max_pool2d(x, 3, stride, padding=1)
    return avg, mx


def pooled_size(n: int, stride: int) -> int:
    """Output length of a 3x3, padding 1 pool along a side of n."""
    return (n - 1) // stride + 1


@triton.jit
def _pool_fwd_kernel(
    x_ptr,  # [NC, H, W]
    avg_ptr,  # [NC, HO, WO]
    max_ptr,  # [NC, HO, WO]
    total,  # NC * HO * WO
    H, W, HO, WO,  # input and output sides
    STRIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_out = i_b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat output index
    m_out = o_out < total
    o_w = o_out % WO
    o_h = (o_out // WO) % HO
    o_nc = o_out // (WO * HO)
    b_sum = tl.zeros([BLOCK], dtype=tl.float32)
    b_cnt = tl.zeros([BLOCK], dtype=tl.float32)
    b_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for a in tl.static_range(3):
        i_h = o_h * STRIDE - 1 + a
        for b in tl.static_range(3):
            i_w = o_w * STRIDE - 1 + b
            m_in = m_out & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
            b_x = tl.load(x_ptr + (o_nc * H + i_h) * W + i_w, mask=m_in, other=0.0).to(tl.float32)
            b_sum += b_x
            b_cnt += m_in.to(tl.float32)
            b_max = tl.where(m_in & ((b_x > b_max) | (b_x != b_x)), b_x, b_max)
    tl.store(avg_ptr + o_out, (b_sum / tl.maximum(b_cnt, 1.0)).to(avg_ptr.dtype.element_ty), mask=m_out)
    tl.store(max_ptr + o_out, b_max.to(max_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _pool_bwd_kernel(
    x_ptr,  # [NC, H, W] the forward input (argmax is recomputed from it)
    g_avg_ptr,  # [NC, HO, WO] gradient of the average pool (unused without HAS_AVG)
    g_max_ptr,  # [NC, HO, WO] gradient of the max pool (unused without HAS_MAX)
    dx_ptr,  # [NC, H, W]
    total,  # NC * H * W
    H, W, HO, WO,  # input and output sides
    STRIDE: tl.constexpr,
    HAS_AVG: tl.constexpr,
    HAS_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_in = i_b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat input index
    m_in = o_in < total
    p_w = o_in % W
    p_h = (o_in // W) % H
    o_nc = o_in // (W * H)
    b_dx = tl.zeros([BLOCK], dtype=tl.float32)
    for a in tl.static_range(3):
        # the window whose row offset a lands on p_h starts at s*i - 1 = p_h - a
        t_h = p_h + 1 - a
        i_h = t_h // STRIDE
        m_h = (t_h >= 0) & (t_h % STRIDE == 0) & (i_h < HO)
        for b in tl.static_range(3):
            t_w = p_w + 1 - b
            i_w = t_w // STRIDE
            m_win = m_in & m_h & (t_w >= 0) & (t_w % STRIDE == 0) & (i_w < WO)
            o_win = (o_nc * HO + i_h) * WO + i_w
            if HAS_AVG:
                n_h = tl.minimum(i_h * STRIDE + 1, H - 1) - tl.maximum(i_h * STRIDE - 1, 0) + 1
                n_w = tl.minimum(i_w * STRIDE + 1, W - 1) - tl.maximum(i_w * STRIDE - 1, 0) + 1
                b_g = tl.load(g_avg_ptr + o_win, mask=m_win, other=0.0).to(tl.float32)
                b_dx += b_g / (n_h * n_w).to(tl.float32)
            if HAS_MAX:
                # recompute the window's argmax, as an offset (a2, b2) inside the window
                b_best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
                b_arg = tl.full([BLOCK], -1, dtype=tl.int32)
                for a2 in tl.static_range(3):
                    q_h = i_h * STRIDE - 1 + a2
                    for b2 in tl.static_range(3):
                        q_w = i_w * STRIDE - 1 + b2
                        m_q = m_win & (q_h >= 0) & (q_h < H) & (q_w >= 0) & (q_w < W)
                        b_q = tl.load(x_ptr + (o_nc * H + q_h) * W + q_w, mask=m_q, other=0.0).to(tl.float32)
                        take = m_q & ((b_q > b_best) | (b_q != b_q) | (b_arg < 0))
                        b_best = tl.where(take, b_q, b_best)
                        b_arg = tl.where(take, a2 * 3 + b2, b_arg)
                b_g = tl.load(g_max_ptr + o_win, mask=m_win, other=0.0).to(tl.float32)
                b_dx += tl.where(m_win & (b_arg == a * 3 + b), b_g, 0.0)
    tl.store(dx_ptr + o_in, b_dx.to(dx_ptr.dtype.element_ty), mask=m_in)


def _check(x: torch.Tensor, stride: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"pool_candidates expects x of shape (N, C, H, W), got {tuple(x.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"pool_candidates stride must be 1 or 2, got {stride!r}")


def pool_candidates_forward(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward: (avg pool, max pool) from one read of x."""
    _check(x, stride)
    n, c, h, w = x.shape
    ho, wo = pooled_size(h, stride), pooled_size(w, stride)
    xc = x.contiguous()
    avg = empty((n, c, ho, wo), x.dtype, x.device)
    mx = empty((n, c, ho, wo), x.dtype, x.device)
    total = avg.numel()
    _pool_fwd_kernel[(triton.cdiv(total, BLOCK),)](xc, avg, mx, total, h, w, ho, wo, STRIDE=stride, BLOCK=BLOCK)
    return avg, mx


def pool_candidates_backward(x: torch.Tensor, stride: int, grad_avg: torch.Tensor | None,
                             grad_max: torch.Tensor | None) -> torch.Tensor:
    """The Triton backward: dL/dx from both pools' gradients (either may be None)."""
    _check(x, stride)
    n, c, h, w = x.shape
    ho, wo = pooled_size(h, stride), pooled_size(w, stride)
    xc = x.contiguous()
    dx = empty((n, c, h, w), x.dtype, x.device)
    if grad_avg is None and grad_max is None:
        return dx.zero_()
    g_avg = grad_avg.contiguous() if grad_avg is not None else xc
    g_max = grad_max.contiguous() if grad_max is not None else xc
    total = dx.numel()
    _pool_bwd_kernel[(triton.cdiv(total, BLOCK),)](xc, g_avg, g_max, dx, total, h, w, ho, wo, STRIDE=stride,
                                                   HAS_AVG=grad_avg is not None, HAS_MAX=grad_max is not None,
                                                   BLOCK=BLOCK)
    return dx


class PoolCandidates(torch.autograd.Function):
    """Autograd over the Triton kernels; saves x only and recomputes the argmax in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: int):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return pool_candidates_forward(x, stride)

    @staticmethod
    def backward(ctx, grad_avg: torch.Tensor | None, grad_max: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        return pool_candidates_backward(x, ctx.stride, grad_avg, grad_max), None


def pool_candidates_triton(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton (avg pool, max pool)."""
    return PoolCandidates.apply(x, stride)


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for every kernel here, for ahead-of-time compile checks."""
    specs = []  # both strides in fp32, stride 2 in bf16 (half precision only changes loads and stores)
    for dtype, stride in (("fp32", 1), ("fp32", 2), ("bf16", 2)):
        specs.append((_pool_fwd_kernel,
                      {"x_ptr": f"*{dtype}", "avg_ptr": f"*{dtype}", "max_ptr": f"*{dtype}", "total": "i32",
                       "H": "i32", "W": "i32", "HO": "i32", "WO": "i32", "STRIDE": "constexpr",
                       "BLOCK": "constexpr"},
                      {"STRIDE": stride, "BLOCK": BLOCK}))
        specs.append((_pool_bwd_kernel,
                      {"x_ptr": f"*{dtype}", "g_avg_ptr": f"*{dtype}", "g_max_ptr": f"*{dtype}",
                       "dx_ptr": f"*{dtype}", "total": "i32", "H": "i32", "W": "i32", "HO": "i32", "WO": "i32",
                       "STRIDE": "constexpr", "HAS_AVG": "constexpr", "HAS_MAX": "constexpr",
                       "BLOCK": "constexpr"},
                      {"STRIDE": stride, "HAS_AVG": True, "HAS_MAX": True, "BLOCK": BLOCK}))
    return specs
