"""Horizontal fusion of an edge's candidate convolutions: several depthwise + pointwise stages as two convs.

Candidate j (of m) applies a depthwise kernel w_j (C, 1, k_j, k_j) with dilation d_j and padding
d_j * (k_j - 1) / 2, then a pointwise kernel p_j (C_out, C, 1, 1). Every depthwise kernel whose span
d_j * (k_j - 1) + 1 is at most 5 (3x3, 5x5, dilated 3x3) is placed, dilated and centred, into one 5x5
footprint with padding 2: same taps, same output size. Stacked as a channel multiplier m they form one
depthwise conv (C*m output channels, channel c*m + j); a channel shuffle puts each candidate's channels
together, and one grouped 1x1 conv (groups=m) applies every p_j. Output channels [j*C_out, (j+1)*C_out)
are candidate j's.

This is composed from torch convolutions (cuDNN on a GPU, oneDNN on the CPU); no Triton kernel:
see the report in bench/README.md for why and the measurements behind it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FOOTPRINT = 5  # the shared depthwise kernel size: holds 3x3, 5x5 and 3x3 with dilation 2


def span(kernel_size: int, dilation: int) -> int:
    """How many input pixels a dilated kernel covers along one side."""
    return dilation * (kernel_size - 1) + 1


def footprint_kernel(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """A (C, 1, k, k) depthwise kernel with `dilation`, as an equivalent (C, 1, 5, 5) undilated one."""
    k = weight.shape[-1]
    s = span(k, dilation)
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[-2] != k or s > FOOTPRINT or s % 2 == 0:
        raise ValueError(f"depthwise kernel of shape {tuple(weight.shape)} with dilation {dilation} does not fit "
                         f"a centred {FOOTPRINT}x{FOOTPRINT} footprint; expected (C, 1, k, k) with odd span <= 5")
    if dilation > 1:
        dilated = weight.new_zeros(weight.shape[0], 1, s, s)
        dilated[:, :, ::dilation, ::dilation] = weight
        weight = dilated
    pad = (FOOTPRINT - s) // 2
    return F.pad(weight, (pad, pad, pad, pad))


def depthwise_pointwise_reference(x: torch.Tensor, depthwise: Sequence[torch.Tensor], dilations: Sequence[int],
                                  pointwise: Sequence[torch.Tensor], stride: int) -> torch.Tensor:
    """Each candidate's depthwise then pointwise conv, separately, concatenated along channels."""
    outs = []
    for w, d, p in zip(depthwise, dilations, pointwise):
        pad = d * (w.shape[-1] - 1) // 2
        y = F.conv2d(x, w, stride=stride, padding=pad, dilation=d, groups=x.shape[1])
        outs.append(F.conv2d(y, p))
    return torch.cat(outs, dim=1)


def depthwise_pointwise_fused(x: torch.Tensor, depthwise: Sequence[torch.Tensor], dilations: Sequence[int],
                              pointwise: Sequence[torch.Tensor], stride: int) -> torch.Tensor:
    """The same result from one depthwise conv (channel multiplier m) and one grouped 1x1 conv."""
    if not (len(depthwise) == len(dilations) == len(pointwise) >= 1):
        raise ValueError(f"need as many depthwise kernels, dilations and pointwise kernels (at least one), got "
                         f"{len(depthwise)}, {len(dilations)} and {len(pointwise)}")
    n, c = x.shape[:2]
    m = len(depthwise)
    if any(w.shape[0] != c for w in depthwise):
        raise ValueError(f"depthwise kernels must have {c} channels (x has {c}), got {[w.shape[0] for w in depthwise]}")
    kernel = torch.stack([footprint_kernel(w, d)[:, 0] for w, d in zip(depthwise, dilations)], dim=1)  # (C, m, 5, 5)
    y = F.conv2d(x, kernel.reshape(c * m, 1, FOOTPRINT, FOOTPRINT), stride=stride, padding=FOOTPRINT // 2,
                 groups=c)  # (N, C*m, Ho, Wo), channel c*m + j
    ho, wo = y.shape[-2:]
    y = y.view(n, c, m, ho, wo).transpose(1, 2).reshape(n, m * c, ho, wo)  # channel j*C + c
    return F.conv2d(y, torch.cat(list(pointwise), dim=0), groups=m)


def grouped_depthwise_pointwise(x: torch.Tensor, depthwise: Sequence[torch.Tensor], dilations: Sequence[int],
                                pointwise: Sequence[torch.Tensor]) -> torch.Tensor:
    """Candidate j's depthwise + pointwise conv on its own channel block j of x (stride 1), as two convs."""
    m = len(depthwise)
    kernel = torch.cat([footprint_kernel(w, d) for w, d in zip(depthwise, dilations)], dim=0)  # (m*C, 1, 5, 5)
    y = F.conv2d(x, kernel, padding=FOOTPRINT // 2, groups=x.shape[1])
    return F.conv2d(y, torch.cat(list(pointwise), dim=0), groups=m)


def grouped_depthwise_pointwise_reference(x: torch.Tensor, depthwise: Sequence[torch.Tensor],
                                          dilations: Sequence[int], pointwise: Sequence[torch.Tensor]) -> torch.Tensor:
    """grouped_depthwise_pointwise, one candidate at a time."""
    chunks = x.chunk(len(depthwise), dim=1)
    return torch.cat([depthwise_pointwise_reference(xc, [w], [d], [p], 1)
                      for xc, w, d, p in zip(chunks, depthwise, dilations, pointwise)], dim=1)
