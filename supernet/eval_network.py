"""Stand-alone networks built from a genotype, as DARTS (CIFAR, ImageNet) and NAS-Bench-201 train them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .ops import FactorizedReduce, Identity, ReLUConvBN, build_op
from .search_network import ResNetBasicBlock
from .spaces import CellSpace, get_space
from .spaces.darts import Genotype, _all_darts_ops, check_cell


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zeroes whole samples with probability `drop_prob` and rescales the rest (DARTS's drop path)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x / keep * mask


class DartsCell(nn.Module):
    """A fixed DARTS-style cell: each node sums two ops applied to earlier nodes."""

    def __init__(self, genotype: Genotype, C_pp: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        gene = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = [src for _, src in gene]
        self.ops = nn.ModuleList(build_op(op, C, 2 if reduction and src < 2 else 1, affine=True) for op, src in gene)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            total = 0
            for op, src in ((self.ops[2 * i], self.indices[2 * i]), (self.ops[2 * i + 1], self.indices[2 * i + 1])):
                h = op(states[src])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Sequential):
    """DARTS's auxiliary classifier: CIFAR (8x8 input) or ImageNet (14x14 input, no second BN)."""

    def __init__(self, C: int, num_classes: int, imagenet: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
        ]
        if not imagenet:
            layers.append(nn.BatchNorm2d(768))
        layers += [nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(768, num_classes)]
        super().__init__(*layers)


class NB201Cell(nn.Module):
    """A fixed NAS-Bench-201 cell; the last node is the output."""

    def __init__(self, genotype, C: int) -> None:
        super().__init__()
        self.nodes = [[src for _, src in node] for node in genotype]
        self.ops = nn.ModuleList(nn.ModuleList(build_op(op, C, 1, affine=True) for op, _ in node) for node in genotype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [x]
        for srcs, ops in zip(self.nodes, self.ops):
            states.append(sum(op(states[src]) for src, op in zip(srcs, ops)))
        return states[-1]


class EvalNetwork(nn.Module):
    """The network trained from scratch on a genotype.

    darts: DARTS's NetworkCIFAR (`stem='cifar'`) or NetworkImageNet (`stem='imagenet'`); in training
    mode with `auxiliary=True` the forward returns `(logits, aux_logits)`. `drop_path_prob` starts at
    `drop_path` and is what a training loop schedules.
    nb201: NAS-Bench-201's tiny network, `layers` cells per stage (its N).
    """

    def __init__(self, space: "str | CellSpace", genotype: Any, C: int, layers: int, num_classes: int,
                 auxiliary: bool = False, drop_path: float = 0.0, stem: str = "cifar", in_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("C", C), ("layers", layers), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.space = get_space(space)
        self.in_channels = in_channels
        self.auxiliary = auxiliary
        self.drop_path_prob = drop_path
        if self.space.name == "nb201":
            if auxiliary or drop_path or stem != "cifar":
                raise ValueError("the nb201 network has no auxiliary head, drop path or ImageNet stem")
            self.genotype = self.space.validate(genotype)
            self._build_nb201(C, layers, num_classes)
        else:
            self.genotype = _darts_genotype(self.space, genotype)
            self._build_darts(C, layers, num_classes, stem)

    def _build_darts(self, C: int, layers: int, num_classes: int, stem: str) -> None:
        self.layers = layers
        if stem == "cifar":
            C_stem = 3 * C
            self.stem = nn.Sequential(nn.Conv2d(self.in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
            C_pp = C_prev = C_stem
            reduction_prev = False
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(self.in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C))
            C_pp = C_prev = C
            reduction_prev = True
        self.imagenet = stem == "imagenet"
        C_curr = C
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = DartsCell(self.genotype, C_pp, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
        if self.auxiliary:
            self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, imagenet=self.imagenet)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def _build_nb201(self, C: int, N: int, num_classes: int) -> None:
        self.stem = nn.Sequential(nn.Conv2d(self.in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, C_stage in enumerate((C, 2 * C, 4 * C)):
            if stage:
                self.cells.append(ResNetBasicBlock(C_prev, C_stage, 2))
            self.cells.extend(NB201Cell(self.genotype, C_stage) for _ in range(N))
            C_prev = C_stage
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input has shape {shape}; expected (batch, {self.in_channels}, height, width)")
        if self.space.name == "nb201":
            s = x
            s = self.stem(s)
            for cell in self.cells:
                s = cell(s)
            s = self.lastact(s)
            return self.classifier(self.global_pooling(s).flatten(1))
        aux = None
        if self.imagenet:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self.layers // 3 and self.auxiliary and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, aux) if aux is not None else logits


def _darts_genotype(space: CellSpace, genotype: Any) -> Genotype:
    if isinstance(genotype, str):
        return space.parse(genotype)
    if not isinstance(genotype, tuple) or len(genotype) != 4:
        raise ValueError(f"expected a DARTS Genotype, got {genotype!r}")
    genotype = Genotype(*genotype)
    for ct in ("normal", "reduce"):
        check_cell(getattr(genotype, ct), getattr(genotype, ct + "_concat"), ct, _all_darts_ops())
    return genotype


def count_parameters(model: nn.Module, exclude: Sequence[str] = ("auxiliary",)) -> int:
    """Parameters, without the auxiliary head (as DARTS reports model size)."""
    return sum(p.numel() for n, p in model.named_parameters() if not any(e in n for e in exclude))
