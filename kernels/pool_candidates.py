"""pool_candidates: 3x3 average pooling (padding not counted) and 3x3 max pooling in one pass over x.

Math, for an output position (i, j) with stride s and padding 1, over the window
W(i, j) = {(s*i - 1 + a, s*j - 1 + b) : a, b in 0..2} clipped to the image:
    avg[i, j] = sum_{W} x / |W|           max[i, j] = x[argmax_{W} x]
    dL/dx[p]  = sum_{(i, j): p in W(i, j)} g_avg[i, j] / |W(i, j)|
              + sum_{(i, j): argmax W(i, j) = p} g_max[i, j]
The backward gathers, per input element, over the at most 9 windows that contain it, and recomputes
each window's argmax rather than saving it (first maximum in scan order, a NaN wins, as PyTorch does).
Gathering instead of scattering keeps the sum order fixed, so results are deterministic.
The skip candidate (identity at stride 1) needs no kernel.

With statistics (`pool_stats_*`), the same pass also reduces, for each pool output y and channel c,
the first stage of the batch-norm statistics: per program (one plane n, c and a block of it) the count
n_p, the sum s_p and the centred sum of squares q_p = sum (y - s_p/n_p)^2. The second stage (torch,
over the tiny partial buffer) merges them as Chan et al. do, which avoids E[y^2] - E[y]^2 cancellation:
    mean_c = sum_p s_p / M,   var_c = (sum_p q_p + sum_p n_p (s_p/n_p - mean_c)^2) / M,   M = N*HO*WO
(biased variance, as batch norm normalises with). The caller normalises with them; the backward folds
the gradients that reach mean and var into the pools' gradients:
    dL/dy = g_y + g_mean / M + g_var * 2 (y - mean) / M
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from . import backend
from ._alloc import empty

BLOCK = 256  # output elements per program; small images (8-32 a side) keep programs busy


def pool_candidates_reference(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3x3 average pool without counting padding, 3x3 max pool), both padding 1, in PyTorch."""
    avg = F.avg_pool2d(x, 3, stride, padding=1, count_include_pad=False)
    mx = F.max_pool2d(x, 3, stride, padding=1)
    return avg, mx


def pool_stats_reference(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    """(avg, max, mean, var): both pools, and per pool and channel the batch mean and biased variance, each (2, C)."""
    avg, mx = pool_candidates_reference(x, stride)
    acc = torch.promote_types(x.dtype, torch.float32)  # statistics in at least fp32, as batch norm keeps them
    var_mean = [torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0) for y in (avg, mx)]
    return avg, mx, torch.stack([m for _, m in var_mean]), torch.stack([v for v, _ in var_mean])


def per_channel(values: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast over (N, C, H, W)."""
    return rearrange(values, "c -> 1 c 1 1")


def fold_stats_grad(y: torch.Tensor, mean: torch.Tensor, grad_y: torch.Tensor | None, grad_mean: torch.Tensor | None,
                    grad_var: torch.Tensor | None) -> torch.Tensor | None:
    """dL/dy given the gradients reaching y directly and through its channel mean and biased variance."""
    if grad_mean is None and grad_var is None:
        return grad_y
    count = y.numel() // y.shape[1]
    acc = torch.promote_types(y.dtype, torch.float32)
    g = grad_y.to(acc) if grad_y is not None else torch.zeros_like(y, dtype=acc)
    if grad_mean is not None:
        g = g + per_channel(grad_mean.to(acc) / count)
    if grad_var is not None:
        g = g + (y.to(acc) - per_channel(mean.to(acc))) * per_channel(2.0 * grad_var.to(acc) / count)
    return g.to(y.dtype)


def pooled_size(n: int, stride: int) -> int:
    """Output length of a 3x3, padding 1 pool along a side of n."""
    return (n - 1) // stride + 1


@triton.jit
def _pool_window(x_ptr, o_nc, o_h, o_w, m_out, H, W, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """(avg, max) in fp32 of the 3x3 windows at output rows o_h, columns o_w of planes o_nc."""
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
    return b_sum / tl.maximum(b_cnt, 1.0), b_max


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
    b_avg, b_max = _pool_window(x_ptr, o_nc, o_h, o_w, m_out, H, W, STRIDE, BLOCK)
    tl.store(avg_ptr + o_out, b_avg.to(avg_ptr.dtype.element_ty), mask=m_out)
    tl.store(max_ptr + o_out, b_max.to(max_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _pool_stats_fwd_kernel(
    x_ptr,  # [NC, H, W]
    avg_ptr,  # [NC, HO, WO]
    max_ptr,  # [NC, HO, WO]
    part_ptr,  # [4, NC, NB] fp32: per program, sum and centred sum of squares of avg, then of max
    H, W, HO, WO,  # input and output sides
    NB,  # programs per plane: cdiv(HO * WO, BLOCK)
    STRIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_nc = tl.program_id(0).to(tl.int64)  # one plane (n, c) per row of programs: a program sees one channel
    i_b = tl.program_id(1).to(tl.int64)
    hw = HO * WO
    o_hw = i_b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] index inside the plane
    m_out = o_hw < hw
    o_nc = tl.zeros([BLOCK], dtype=tl.int64) + i_nc
    b_avg, b_max = _pool_window(x_ptr, o_nc, o_hw // WO, o_hw % WO, m_out, H, W, STRIDE, BLOCK)
    # statistics of the values as stored, so half precision matches batch norm applied to the outputs
    b_avg = b_avg.to(avg_ptr.dtype.element_ty)
    b_max = b_max.to(max_ptr.dtype.element_ty)
    tl.store(avg_ptr + i_nc * hw + o_hw, b_avg, mask=m_out)
    tl.store(max_ptr + i_nc * hw + o_hw, b_max, mask=m_out)
    b_avg = tl.where(m_out, b_avg.to(tl.float32), 0.0)
    b_max = tl.where(m_out, b_max.to(tl.float32), 0.0)
    n_p = tl.minimum(hw - i_b * BLOCK, BLOCK).to(tl.float32)
    s_avg = tl.sum(b_avg, axis=0)
    s_max = tl.sum(b_max, axis=0)
    d_avg = tl.where(m_out, b_avg - s_avg / n_p, 0.0)
    d_max = tl.where(m_out, b_max - s_max / n_p, 0.0)
    parts = tl.num_programs(0).to(tl.int64) * NB
    p_part = part_ptr + i_nc * NB + i_b
    tl.store(p_part, s_avg)
    tl.store(p_part + parts, tl.sum(d_avg * d_avg, axis=0))
    tl.store(p_part + 2 * parts, s_max)
    tl.store(p_part + 3 * parts, tl.sum(d_max * d_max, axis=0))


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


def stats_block(plane: int) -> int:
    """Outputs per program of the statistics kernel: a plane (up to 1024) per program, at least 32."""
    return min(1024, max(32, triton.next_power_of_2(plane)))


def finish_stats(part: torch.Tensor, plane: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second stage: (mean, biased var), each (2, C), from the partials [4, N, C, NB] of `plane` outputs a plane."""
    nb = part.shape[-1]
    n_p = (plane - block * torch.arange(nb, device=part.device)).clamp(max=block).to(torch.float32)  # [NB]
    sums, squares = part[0::2], part[1::2]  # [2, N, C, NB]
    count = part.shape[1] * plane
    mean = sums.sum(dim=(1, 3)) / count  # [2, C]
    spread = n_p * (sums / n_p - mean[:, None, :, None]).square()
    var = (squares.sum(dim=(1, 3)) + spread.sum(dim=(1, 3))) / count
    return mean, var


def pool_stats_forward(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    """The Triton forward with statistics: (avg, max, mean, var) from one read of x (mean, var: (2, C))."""
    _check(x, stride)
    n, c, h, w = x.shape
    ho, wo = pooled_size(h, stride), pooled_size(w, stride)
    xc = x.contiguous()
    avg = empty((n, c, ho, wo), x.dtype, x.device)
    mx = empty((n, c, ho, wo), x.dtype, x.device)
    block = stats_block(ho * wo)
    nb = triton.cdiv(ho * wo, block)
    part = empty((4, n, c, nb), torch.float32, x.device)
    _pool_stats_fwd_kernel[(n * c, nb)](xc, avg, mx, part, h, w, ho, wo, nb, STRIDE=stride, BLOCK=block)
    acc = torch.promote_types(x.dtype, torch.float32)
    return avg, mx, *(t.to(acc) for t in finish_stats(part, ho * wo, block))


# --- the custom ops (what torch.compile traces) and the one autograd wrapper over each --------------
def _pooled_shape(x: torch.Tensor, stride: int) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, c, pooled_size(h, stride), pooled_size(w, stride)


@torch.library.custom_op("supernet::pool_candidates", mutates_args=())
def pool_candidates_op(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(avg pool, max pool): one Triton pass over x on CUDA, PyTorch's two pools on the CPU (faster there)."""
    if backend.uses_triton(x):
        return pool_candidates_forward(x, stride)
    return pool_candidates_reference(x, stride)


@pool_candidates_op.register_fake
def _(x, stride):
    shape = _pooled_shape(x, stride)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("supernet::pool_candidates_stats", mutates_args=())
def pool_stats_op(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(avg pool, max pool, mean, biased var), mean and var (2, C) in at least fp32: both pools' batch statistics."""
    if backend.uses_triton(x):
        return pool_stats_forward(x, stride)
    return pool_stats_reference(x, stride)


@pool_stats_op.register_fake
def _(x, stride):
    shape = _pooled_shape(x, stride)
    acc = torch.promote_types(x.dtype, torch.float32)
    c = x.shape[1]
    return x.new_empty(shape), x.new_empty(shape), x.new_empty((2, c), dtype=acc), x.new_empty((2, c), dtype=acc)


@torch.library.custom_op("supernet::pool_candidates_backward", mutates_args=())
def pool_backward_op(x: torch.Tensor, stride: int, grad_avg: torch.Tensor, grad_max: torch.Tensor) -> torch.Tensor:
    """dL/dx of both pools; the max pool's argmax is recomputed from x."""
    if backend.uses_triton(x):
        return pool_candidates_backward(x, stride, grad_avg, grad_max)
    dx = torch.ops.aten.avg_pool2d_backward(grad_avg, x, [3, 3], [stride, stride], [1, 1], False, False, None)
    _, index = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [stride, stride], [1, 1])
    return dx + torch.ops.aten.max_pool2d_with_indices_backward(grad_max, x, [3, 3], [stride, stride], [1, 1],
                                                                 [1, 1], False, index)


@pool_backward_op.register_fake
def _(x, stride, grad_avg, grad_max):
    return torch.empty_like(x)


class PoolCandidates(torch.autograd.Function):
    """The autograd wrapper of the two pools; saves x only and recomputes the argmax in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: int):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return pool_candidates_op(x, stride)

    @staticmethod
    def backward(ctx, grad_avg: torch.Tensor | None, grad_max: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        shape = _pooled_shape(x, ctx.stride)
        grad_avg = grad_avg if grad_avg is not None else x.new_zeros(shape)
        grad_max = grad_max if grad_max is not None else x.new_zeros(shape)
        return pool_backward_op(x, ctx.stride, grad_avg, grad_max), None


class PoolStats(torch.autograd.Function):
    """The autograd wrapper of the two pools with their batch statistics; folds the statistics' gradients
    into the pools' and runs the pools' backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: int):
        avg, mx, mean, var = pool_stats_op(x, stride)
        ctx.save_for_backward(x, avg, mx, mean)
        ctx.stride = stride
        return avg, mx, mean, var

    @staticmethod
    def backward(ctx, grad_avg, grad_max, grad_mean, grad_var):
        x, avg, mx, mean = ctx.saved_tensors
        pick = [(g[k] if g is not None else None) for k in (0, 1) for g in (grad_mean, grad_var)]
        grad_avg = fold_stats_grad(avg, mean[0], grad_avg, pick[0], pick[1])
        grad_max = fold_stats_grad(mx, mean[1], grad_max, pick[2], pick[3])
        grad_avg = grad_avg if grad_avg is not None else torch.zeros_like(avg)
        grad_max = grad_max if grad_max is not None else torch.zeros_like(mx)
        return pool_backward_op(x, ctx.stride, grad_avg, grad_max), None


def pool_candidates(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (3x3 avg pool without padding in the count, 3x3 max pool), padding 1."""
    _check(x, stride)
    return PoolCandidates.apply(x, stride)


def pool_stats(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    """Differentiable (avg pool, max pool, mean, biased var), mean and var (2, C) per pool and channel."""
    _check(x, stride)
    return PoolStats.apply(x, stride)


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
    # the statistics kernel at the smallest block (8x8 planes) and the largest (32x32 planes)
    for dtype, stride, block in (("fp32", 1, stats_block(64)), ("fp32", 2, stats_block(1024)), ("bf16", 2, 1024)):
        specs.append((_pool_stats_fwd_kernel,
                      {"x_ptr": f"*{dtype}", "avg_ptr": f"*{dtype}", "max_ptr": f"*{dtype}", "part_ptr": "*fp32",
                       "H": "i32", "W": "i32", "HO": "i32", "WO": "i32", "NB": "i32", "STRIDE": "constexpr",
                       "BLOCK": "constexpr"},
                      {"STRIDE": stride, "BLOCK": block}))
    return specs
