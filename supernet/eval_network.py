"""Stand-alone networks built from a genotype, as DARTS (CIFAR, ImageNet) and NAS-Bench-201 train them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checks import choice, images, integer, number
from .ops import Identity, build_op
from .registry import Registry
from .search_network import ResNetBasicBlock, cell_preprocess
from .spaces import CellSpace, get_space
from .spaces.darts import Genotype


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zeroes whole samples with probability `drop_prob` and rescales the rest (DARTS's drop path)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x / keep * mask


class DartsCell(nn.Module):
    """A fixed DARTS-style cell: each node sums two ops applied to earlier nodes."""

    def __init__(self, genotype: Genotype, inputs: list[tuple[int, int]], C: int, reduction: bool) -> None:
        super().__init__()
        self.preprocess0, self.preprocess1 = cell_preprocess(inputs, C, affine=True)
        gene = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = [src for _, src in gene]
        self.ops = nn.ModuleList(build_op(op, C, 2 if reduction and src < 2 else 1, affine=True) for op, src in gene)
        self.multiplier = len(self.concat)
        self.out_channels = self.multiplier * C

    def forward(self, inputs: list[torch.Tensor], drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(inputs[0]), self.preprocess1(inputs[1])]
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

    def __init__(self, genotype, inputs: list[tuple[int, int]], C: int, reduction: bool) -> None:
        super().__init__()
        self.nodes = [[src for _, src in node] for node in genotype]
        self.ops = nn.ModuleList(nn.ModuleList(build_op(op, C, 1, affine=True) for op, _ in node) for node in genotype)
        self.out_channels = C

    def forward(self, inputs: list[torch.Tensor], drop_prob: float) -> torch.Tensor:
        states = list(inputs)
        for srcs, ops in zip(self.nodes, self.ops):
            states.append(sum(op(states[src]) for src, op in zip(srcs, ops)))
        return states[-1]


# The fixed cell class of each space: built from (genotype, inputs as (channels, reductions), C, reduction).
FIXED_CELLS: Registry[type[nn.Module]] = Registry("fixed cell")
FIXED_CELLS.add("darts", DartsCell)
FIXED_CELLS.add("nb201", NB201Cell)


class EvalNetwork(nn.Module):
    """The network trained from scratch on a genotype, on the skeleton its space declares.

    darts: DARTS's NetworkCIFAR (`stem='cifar'`) or NetworkImageNet (`stem='imagenet'`); in training
    mode with `auxiliary=True` the forward returns `(logits, aux_logits)`. `drop_path_prob` starts at
    `drop_path` and is what a training loop schedules.
    nb201: NAS-Bench-201's tiny network, `layers` cells per stage (its N).
    """

    def __init__(self, space: "str | CellSpace", genotype: Any, C: int, layers: int, num_classes: int,
                 auxiliary: bool = False, drop_path: float = 0.0, stem: str = "cifar", in_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("C", C), ("layers", layers), ("num_classes", num_classes), ("in_channels", in_channels)):
            integer(name, value)
        number("drop_path", drop_path, non_negative=True, maximum=1.0, open_maximum=True)
        choice("stem", stem, ("cifar", "imagenet"))
        self.space = get_space(space)
        if not self.space.training_extras and (auxiliary or drop_path or stem != "cifar"):
            raise ValueError(f"the {self.space.name} network has no auxiliary head, drop path or ImageNet stem")
        self.genotype = self.space.validate_fixed(genotype)
        self.C, self.layers, self.num_classes, self.in_channels = C, layers, num_classes, in_channels
        self.auxiliary = auxiliary
        self.drop_path_prob = drop_path
        self.stem_kind = stem
        self.imagenet = stem == "imagenet"
        self._build(C, layers, num_classes)

    def _build(self, C: int, layers: int, num_classes: int) -> None:
        space = self.space
        if self.imagenet:  # two stems: the first cell reads both, the older one at twice the resolution
            self.stem0 = nn.Sequential(
                nn.Conv2d(self.in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C))
            inputs = [(C, 0), (C, 1)]
        else:
            C_stem = space.stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(self.in_channels, C_stem, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(C_stem))
            inputs = [(C_stem, 0)] * space.num_input_nodes
        cell_class = FIXED_CELLS.get(space.name)
        blocks = space.blocks(C, layers)
        # DARTS's auxiliary head reads the output of the last reduction.
        self.aux_index = max((i for i, b in enumerate(blocks) if b.reduction), default=None)
        self.cells = nn.ModuleList()
        for i, block in enumerate(blocks):
            if block.kind == "residual":
                self.cells.append(ResNetBasicBlock(inputs[-1][0], block.channels, 2))
                C_out = block.channels
            else:
                cell = cell_class(self.genotype, inputs, block.channels, block.reduction)
                self.cells.append(cell)
                C_out = cell.out_channels
            inputs = (inputs + [(C_out, inputs[-1][1] + block.reduction)])[-len(inputs):]
            if i == self.aux_index:
                C_aux = C_out
        if self.auxiliary:
            self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, imagenet=self.imagenet)
        if space.final_activation:
            self.lastact = nn.Sequential(nn.BatchNorm2d(inputs[-1][0]), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(inputs[-1][0], num_classes)

    def forward(self, x: torch.Tensor):
        images(x, self.in_channels, dtype=self.classifier.weight.dtype)
        if self.imagenet:
            s0 = self.stem0(x)
            states = [s0, self.stem1(s0)]
        else:
            states = [self.stem(x)] * self.space.num_input_nodes
        aux = None
        for i, cell in enumerate(self.cells):
            out = cell(states[-1]) if isinstance(cell, ResNetBasicBlock) else cell(states, self.drop_path_prob)
            states = (states + [out])[1:]
            if i == self.aux_index and self.auxiliary and self.training:
                aux = self.auxiliary_head(out)
        s = self.lastact(states[-1]) if self.space.final_activation else states[-1]
        logits = self.classifier(self.global_pooling(s).flatten(1))
        return (logits, aux) if aux is not None else logits


def count_parameters(model: nn.Module, exclude: Sequence[str] = ("auxiliary",)) -> int:
    """Parameters, without the auxiliary head (as DARTS reports model size)."""
    return sum(p.numel() for n, p in model.named_parameters() if not any(e in n for e in exclude))
