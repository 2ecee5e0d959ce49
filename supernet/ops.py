"""Candidate operations, with the exact semantics of DARTS (`cnn/operations.py`) and NAS-Bench-201.

Every factory has the signature `(C, stride, affine) -> nn.Module` and maps C channels to C channels.
Search networks build ops with `affine=False`; evaluation networks with `affine=True`.

Candidates declare their stages, so the fused path (`dispatch.edge_outputs`) can share work between an
edge's candidates without knowing their layouts: a `StartsWithReLU` runs `after_relu(relu(x))`, a
`PoolBN` is a pool followed by its batch norm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

OpFactory = Callable[[int, int, bool], nn.Module]
OPS: Registry[OpFactory] = Registry("candidate op")


class StartsWithReLU(nn.Module):
    """A candidate whose first stage is a ReLU of its input: the fused path computes that ReLU once per edge."""

    def after_relu(self, rectified: torch.Tensor) -> torch.Tensor:
        """The candidate's output given relu(x)."""
        raise NotImplementedError


class ReLUSequential(nn.Sequential, StartsWithReLU):
    """nn.Sequential(ReLU, *layers): keeps nn.Sequential's parameter names (0.weight, ...)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(nn.ReLU(inplace=False), *layers)

    def __getitem__(self, index):
        # a slice need not start with the ReLU: it is a plain nn.Sequential
        return nn.Sequential(*list(self)[index]) if isinstance(index, slice) else super().__getitem__(index)

    def after_relu(self, rectified: torch.Tensor) -> torch.Tensor:
        for layer in list(self)[1:]:
            rectified = layer(rectified)
        return rectified


class ReLUConvBN(ReLUSequential):
    """ReLU -> Conv -> BN, the ordering every cell-based space uses."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class WrappedReLUSequential(StartsWithReLU):
    """A candidate that is one `ReLUSequential` kept as `.op` (DARTS's parameter names: op.1.weight, ...)."""

    op: ReLUSequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def after_relu(self, rectified: torch.Tensor) -> torch.Tensor:
        return self.op.after_relu(rectified)


class DilConv(WrappedReLUSequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, affine: bool = True) -> None:
        super().__init__()
        self.op = ReLUSequential(
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(WrappedReLUSequential):
    """Two stacked DilConv-like blocks without dilation; only the first one strides (as DARTS)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True) -> None:
        super().__init__()
        self.op = ReLUSequential(
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class PoolBN(nn.Sequential):
    """A pool followed by the non-affine batch norm DARTS puts after pools in search (names 0.*, 1.*)."""

    def __init__(self, pool: nn.Module, C: int) -> None:
        super().__init__(pool, nn.BatchNorm2d(C, affine=False))

    @property
    def pool(self) -> nn.Module:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` candidate. Mixed ops skip it; fixed networks that contain it use this."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halves the resolution with two 1x1 stride-2 convs, the second shifted by one pixel.

    The shifted branch pads one row and column on the bottom-right (as NAS-Bench-201 does), which
    equals DARTS's `x[:, :, 1:, 1:]` on even sizes and also works on odd ones.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _skip(C: int, stride: int, affine: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(C, C, affine)


OPS.add("none", lambda C, stride, affine: Zero(stride))
OPS.add("skip_connect", _skip)
OPS.add("avg_pool_3x3", lambda C, stride, affine: nn.AvgPool2d(3, stride, padding=1,
                                                                count_include_pad=False))
OPS.add("max_pool_3x3", lambda C, stride, affine: nn.MaxPool2d(3, stride, padding=1))
OPS.add("sep_conv_3x3", lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine))
OPS.add("sep_conv_5x5", lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine))
OPS.add("sep_conv_7x7", lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine))
OPS.add("dil_conv_3x3", lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine))
OPS.add("dil_conv_5x5", lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine))
OPS.add("conv_7x1_1x7", lambda C, stride, affine: ReLUSequential(
    nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
    nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
    nn.BatchNorm2d(C, affine=affine),
))
# NAS-Bench-201 convolutions keep a conv bias exactly when the batch norm has no affine shift.
OPS.add("nor_conv_1x1", lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine, bias=not affine))
OPS.add("nor_conv_3x3", lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine, bias=not affine))


def build_op(name: str, C: int, stride: int, affine: bool, pool_batchnorm: bool = False) -> nn.Module:
    """Builds a candidate; `pool_batchnorm` appends the non-affine BN that DARTS puts after pools in search."""
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    op = OPS.get(name)(C, stride, affine)
    if pool_batchnorm and "pool" in name:
        op = PoolBN(op, C)
    return op


def pool_parts(op: nn.Module) -> tuple[nn.Module, nn.BatchNorm2d | None]:
    """(the pool, its batch norm or None) of a pool candidate, with or without `pool_batchnorm`."""
    return (op.pool, op.bn) if isinstance(op, PoolBN) else (op, None)
