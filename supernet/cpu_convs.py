"""Depthwise and 1x1 convolutions of channels_last tensors for the CPU, with the gradients that oneDNN computes
slowly taken another, exact way; which way runs is a fixed function of the shape (rules below, each with the
measurements behind it: `python bench/bench_cpu_rules.py`), never a timing, so a search stays bit-reproducible.
Used by `supernet.batched_cell`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CL = torch.channels_last


# --- depthwise convolution with a faster backward -----------------------------------------------
# oneDNN's depthwise backward on the CPU is several times slower than its forward, worst for 5x5 and
# dilated kernels. The alternatives below are exact (the same sums in another order), and which one runs
# is a fixed function of the shape, from interleaved best-of-7 timings of each gradient (1 thread, the
# stride-1 depthwise shapes of the small and paper configs: N 32/64, C 8-64, sides 4-32; issue 10):
#   input gradient, stride 1: the flipped-kernel forward conv was faster for every kernel, dilation and
#     shape (1.2-15x).
#   weight gradient, stride 1, through 3x3 pieces:
#     3x3 dilation 2: always (1.1-3.2x faster);
#     5x5 dilation 2: on sides <= 8 (2.5-9x faster; oneDNN is slowest where the dilated kernel is wider than
#       the image), not on sides >= 16 (there oneDNN's was 1.5-2.3x faster);
#     5x5 dilation 1: on tensors of >= 2**17 elements (1.7-2.4x faster; on smaller ones oneDNN's was 1.1-2x
#       faster);
#     3x3 dilation 1 is oneDNN's fast case already.
#   weight gradient, stride 1, as one depthwise conv of the padded input with the output gradient as its
#     kernel (every (sample, channel) pair a group, the dilation as its stride), taking precedence over the
#     rules above (`python bench/bench_cpu_rules.py`, idle machine): 5x5 on tensors of < 2**17 elements
#     (1.2-2.5x faster than the best other at N 32, C 8-32, sides 4-16, both dilations; a tie at C 32, side 4,
#     dilation 1), on sides <= 16 up to 2**18 elements once its input reached oneDNN channels_last
#     (`KERNEL_CL_MAX_SIDE`; whole step paired 0.97 for the small config, one and two threads, 0.96 for the
#     paper config, one thread), and on sides >= 32 (1.4-1.5x faster than oneDNN at N 64, C 16; at dilation 1
#     there the 3x3 split measured 1.15x faster still, a refinement not yet taken); 3x3 dilation 2 on sides
#     <= 4 (1.1x; on sides 8-16 the polyphase split was 1.4-6x faster).
#   weight gradient, stride 2 (the reduction cells), as that conv with the output gradient's taps spread 2
#     apart: 5x5 on sides <= 16 (0.45-0.97x oneDNN's time at N 32, C 16-128, 1 and 2 threads; 0.86-0.9x at N 64,
#     C 128, side 16); not 3x3 (3.4-5x slower) nor sides of 32 (2.4-2.6x slower).
SPLIT_MAX_SIDE = 8
SPLIT_MIN_NUMEL = 2 ** 17

# The padded input of `grad_weight_as_conv` reaches oneDNN as a one-image tensor of N*C channels. In NCHW, oneDNN
# reorders it (and the output) to its blocked layout around a conv that takes less time than the reorders; in
# channels_last it takes the input as it is: 0.6-0.9x the time on sides up to 16 (N 32-64, C 8-128, 5x5 and
# dilated 3x3, 1 and 2 threads), 1.0-1.16x on sides of 32, where NCHW stays.
KERNEL_CL_MAX_SIDE = 16


def flip_input_grad(k: int, stride: int, dilation: int) -> bool:
    """Whether a depthwise conv's input gradient runs as a forward conv with the flipped kernel."""
    return stride == 1


def split_weight_grad(k: int, stride: int, dilation: int, shape: Sequence[int]) -> bool:
    """Whether the weight gradient of a depthwise conv of an input of `shape` (N, C, H, W) runs through
    3x3 pieces (`grad_weight_split`)."""
    n, c, h, w = shape
    if stride != 1 or k not in (3, 5) or dilation not in (1, 2) or (k, dilation) == (3, 1):
        return False
    if dilation == 2:
        return h % 2 == 0 and w % 2 == 0 and (k == 3 or max(h, w) <= SPLIT_MAX_SIDE)  # polyphase: even sides
    return n * c * h * w >= SPLIT_MIN_NUMEL


def gradient_as_kernel(k: int, stride: int, dilation: int, shape: Sequence[int]) -> bool:
    """Whether the weight gradient of a depthwise conv of an input of `shape` runs as a conv whose kernel is
    the output gradient (`grad_weight_as_conv`)."""
    n, c, h, w = shape
    if stride == 2:  # the reduction cells' 5x5 (`grad_weight_as_conv` of stride 2)
        return k == 5 and dilation == 1 and max(h, w) <= KERNEL_CL_MAX_SIDE
    if stride != 1 or dilation not in (1, 2):
        return False
    if k == 5:
        return (n * c * h * w < SPLIT_MIN_NUMEL or min(h, w) >= 32
                or (max(h, w) <= KERNEL_CL_MAX_SIDE and n * c * h * w <= 2 * SPLIT_MIN_NUMEL))
    return k == 3 and dilation == 2 and max(h, w) <= 4


def aten_grads(g, x, w, stride, padding, dilation, mask):
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False,
                                               [0, 0], x.shape[1], mask)


def grad_weight_split(x: torch.Tensor, g: torch.Tensor, k: int, dilation: int) -> torch.Tensor:
    """d/dw of a stride-1 'same' depthwise conv through oneDNN's fast 3x3 weight gradient: a dilation-2 conv
    is a dilation-1 conv on the four polyphase images (stacked in the batch); a 5x5 kernel is four
    overlapping 3x3 blocks of the padded input."""
    c = x.shape[1]
    if dilation == 2:
        x = torch.cat([x[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)], 0)
        g = torch.cat([g[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)], 0)
    w3 = x.new_zeros(c, 1, 3, 3)
    if k == 3:
        return aten_grads(g, x, w3, 1, 1, 1, [False, True, False])[1]
    h, wd = x.shape[-2:]
    xp = F.pad(x, (2, 2, 2, 2))
    out = x.new_empty(c, 1, 5, 5)
    for i0 in (0, 2):
        for j0 in (0, 2):
            crop = xp[:, :, i0:i0 + h + 2, j0:j0 + wd + 2].contiguous(memory_format=CL)
            out[:, :, i0:i0 + 3, j0:j0 + 3] = aten_grads(g, crop, w3, 1, 0, 1, [False, True, False])[1]
    return out


def grad_weight_as_conv(x: torch.Tensor, g: torch.Tensor, k: int, dilation: int, stride: int = 1) -> torch.Tensor:
    """d/dw of a 'same'-padded depthwise conv: dw[c, i, j] = sum over n of the correlation of x[n, c] (padded)
    with g[n, c] spread `stride` apart, at offset dilation * (i, j): one depthwise conv with the output gradient
    as its kernel (dilated by the stride), N*C groups and the dilation as its stride, cropped to k x k."""
    n, c, h, w = x.shape
    ho, wo = g.shape[-2:]
    p = dilation * (k // 2)
    if max(h, w) <= KERNEL_CL_MAX_SIDE:  # (1, N*C, H + 2p, W + 2p) channels_last: memory (H, W, N, C)
        xp = F.pad(x.permute(2, 3, 0, 1), (0, 0, 0, 0, p, p, p, p))
        xp = xp.view(1, h + 2 * p, w + 2 * p, n * c).permute(0, 3, 1, 2)
    else:
        xp = F.pad(x, (p, p, p, p)).reshape(1, n * c, h + 2 * p, w + 2 * p)
    out = F.conv2d(xp, g.reshape(n * c, 1, ho, wo), None, dilation, 0, stride, n * c)[:, :, :k, :k]
    return out.reshape(n, c, k, k).sum(0).unsqueeze(1)


def repeat_channels(x: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of a channels_last x side by side along channels (copy-major), channels_last."""
    return torch.cat([x] * copies, dim=1)


def sum_copies(g: torch.Tensor, copies: int) -> torch.Tensor:
    """The gradient of `repeat_channels`: the sum of the copies' gradients."""
    parts = g.chunk(copies, dim=1)
    return sum(parts[1:], parts[0])


class Depthwise(torch.autograd.Function):
    """A depthwise conv (F.conv2d forward) of x, or of `copies` copies of x side by side along channels (edges
    stacked), whose backward takes, by the fixed rules above, oneDNN's own gradients or the faster alternatives.
    Only x is saved: the copies are made again in backward (cheaper than keeping them)."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, dilation, copies=1):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, copies)
        x = repeat_channels(x, copies) if copies > 1 else x
        return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, copies = ctx.conf
        x = repeat_channels(x, copies) if copies > 1 else x
        c, k = x.shape[1], w.shape[-1]
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = gw = None
        if need_x:
            if flip_input_grad(k, stride, dilation):
                gx = F.conv2d(g, w.flip(2, 3), None, 1, padding, dilation, c)
            else:
                gx = aten_grads(g, x, w, stride, padding, dilation, [True, False, False])[0]
            gx = sum_copies(gx, copies) if copies > 1 else gx
        if need_w:
            if gradient_as_kernel(k, stride, dilation, x.shape):
                gw = grad_weight_as_conv(x, g, k, dilation, stride)
            elif split_weight_grad(k, stride, dilation, x.shape):
                gw = grad_weight_split(x, g, k, dilation)
            else:
                gw = aten_grads(g, x, w, stride, padding, dilation, [False, True, False])[1]
        return gx, gw, None, None, None, None


# A dilated depthwise conv whose stride divides its dilation and padding reads only every stride-th row and
# column of its input: it is a stride-1 conv of that subsampled input (dilation and padding divided by the
# stride). oneDNN's backward of the strided dilated conv was the slowest call of the DARTS step (the reduction
# cells' dil_conv edges); on the subsampled input it is a stride-1 'same' conv with the fast backward above:
# forward + backward 3-8x faster (`python bench/bench_cpu_rules.py`, 1 thread; N 32/64, C 8-64, input sides
# 8-64, 3x3 and 5x5, dilation 2, stride 2).
def subsampled_depthwise(stride: int, padding: int, dilation: int) -> bool:
    """Whether a strided depthwise conv runs as a stride-1 conv of its input's every stride-th pixel."""
    return stride > 1 and dilation % stride == 0 and padding % stride == 0


# --- 1x1 convolutions as matmuls ---------------------------------------------------------------
# 1x1 convs (forward + backward, 1 thread, same shapes): one matmul over the (N*H*W, C) view beat oneDNN's
# conv by 1.5-1.6x with up to 2048 rows (N*H*W); from 4096 rows on oneDNN's conv was 1.05-1.3x faster.
PW_MATMUL_MAX_ROWS = 2048


# Beyond those rows, with 8 channels or fewer, two pixels per matmul row against the block-diagonal
# [[W, 0], [0, W]] was 1.2x faster than oneDNN's conv and 1.7x faster than the thin (rows, C) x (C, C) matmul
# (C=8, 8192 rows, forward + backward, 1 thread; `python bench/bench_cpu_rules.py`).
PW_PAIR_MAX_CHANNELS = 8


def pointwise_pixels_per_row(n: int, c_in: int, h: int, w: int) -> int:
    """How many pixels one matmul row holds when a 1x1 conv of a channels_last (N, c_in, h, w) tensor runs as
    a matmul (`pointwise_mm`); 0 where oneDNN's conv runs it."""
    rows = n * h * w
    if rows <= PW_MATMUL_MAX_ROWS:
        return 1
    return 2 if c_in <= PW_PAIR_MAX_CHANNELS and rows % 2 == 0 else 0


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The (E*O, E*C) matrix with the E blocks of `blocks` (E, O, C) on its diagonal: two calls, where
    torch.block_diag(*blocks) makes one per block (and as many again to unbind them)."""
    e, o, c = blocks.shape
    out = blocks.new_zeros(e, o, e, c)
    out.diagonal(dim1=0, dim2=2).copy_(blocks.permute(1, 2, 0))
    return out.view(e * o, e * c)


def pointwise_mm(x: torch.Tensor, w: torch.Tensor, pixels: int) -> torch.Tensor:
    """A 1x1 conv of a channels_last x as one matmul over its (N*H*W / pixels, pixels * C) view, against
    `pixels` copies of the weight on the diagonal: no copy of x, output channels_last."""
    n, c, h, wd = x.shape
    weight = w.view(w.shape[0], c)
    if pixels > 1:
        weight = block_diagonal(weight.expand(pixels, -1, -1))
    y = torch.mm(x.permute(0, 2, 3, 1).reshape(-1, pixels * c), weight.t())
    return y.view(n, h, wd, -1).permute(0, 3, 1, 2)


class BlockDiagonalPointwise(torch.autograd.Function):
    """1x1 convs of E edges stacked along the channels of a channels_last y (edge-major), with weights (E, O, C):
    one matmul against the block-diagonal weight, which is built again in backward rather than saved."""

    @staticmethod
    def forward(ctx, y, weights):
        n, _, h, w = y.shape
        rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        ctx.save_for_backward(rows, weights)
        out = torch.mm(rows, block_diagonal(weights).t())
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, g):
        rows, weights = ctx.saved_tensors
        e, o, c = weights.shape
        n, _, h, w = g.shape
        g_rows = g.permute(0, 2, 3, 1).reshape(-1, e * o)
        gy = gw = None
        if ctx.needs_input_grad[0]:
            gy = torch.mm(g_rows, block_diagonal(weights)).view(n, h, w, -1).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            full = torch.mm(g_rows.t(), rows)  # (E*O, E*C): the diagonal blocks are the edges' gradients
            gw = full.view(e, o, e, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return gy, gw
