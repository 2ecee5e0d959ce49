"""The weight-sharing search network (supernet) for any registered cell space."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import dispatch
from .mixing import MIXING, CellPlan, Fixed, MixingRule, Sample, channel_shuffle
from .ops import FactorizedReduce, ReLUConvBN, build_op
from .spaces import CellSpace, get_space


class MixedEdge(nn.Module):
    """One edge's candidate ops (`none` has no module: it contributes nothing)."""

    def __init__(self, space: CellSpace, C: int, stride: int, channel_divisor: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.channel_divisor = channel_divisor
        self.ops = nn.ModuleDict({
            name: build_op(name, C // channel_divisor, stride, affine=False, pool_batchnorm=space.pool_batchnorm)
            for name in space.ops if name != "none"
        })
        if channel_divisor > 1 and stride == 2:
            # PC-DARTS downsamples the channels that bypass the candidates.
            self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True)


class SearchCell(nn.Module):
    """A supernet cell: every edge of the space's DAG holds all candidates."""

    def __init__(self, space: CellSpace, C: int, reduction: bool, channel_divisor: int,
                 preprocess: Iterable[nn.Module] | None = None) -> None:
        super().__init__()
        self.space = space
        self.reduction = reduction
        self.cell_type = "reduce" if reduction else space.cell_types[0]
        for i, module in enumerate(preprocess or []):
            self.add_module(f"preprocess{i}", module)
        self.edges = nn.ModuleList(
            MixedEdge(space, C, 2 if reduction and src < space.num_input_nodes else 1, channel_divisor)
            for _, src in space.edges
        )

    def forward(self, inputs: list[torch.Tensor], plan: CellPlan, fused: bool) -> torch.Tensor:
        space = self.space
        states = [getattr(self, f"preprocess{i}", nn.Identity())(x) for i, x in enumerate(inputs)]
        for node, node_plan in zip(range(space.num_input_nodes, space.num_input_nodes + space.num_nodes), plan):
            if node_plan.edge_weights is not None:
                s = self._partial_node(node, node_plan, states, fused)
            else:
                outputs = [o for e, ks in dispatch.group_by_edge(node_plan.pairs)
                           for o in dispatch.edge_outputs(self.edges[e].ops, states[space.edges[e][1]],
                                                          [space.ops[k] for k in ks], fused)]
                s = dispatch.mixed_sum(outputs, node_plan.weights, fused) if outputs else self._zeros(states)
            if node_plan.residual is not None:
                s = s + node_plan.residual
            states.append(s)
        if space.num_input_nodes == 1:  # NAS-Bench-201: the last node is the output
            return states[-1]
        return torch.cat(states[space.num_input_nodes:], dim=1)

    def _partial_node(self, node: int, node_plan, states, fused: bool) -> torch.Tensor:
        space = self.space
        edge_outputs = []
        for e in space.node_edges(node):
            edge = self.edges[e]
            x = states[space.edges[e][1]]
            c = x.shape[1] // edge.channel_divisor
            mine = [(i, k) for i, (pe, k) in enumerate(node_plan.pairs) if pe == e]
            outputs = dispatch.edge_outputs(edge.ops, x[:, :c], [space.ops[k] for _, k in mine], fused)
            mixed = dispatch.mixed_sum(outputs, node_plan.weights[[i for i, _ in mine]], fused)
            rest = x[:, c:] if edge.stride == 1 else edge.bypass(x[:, c:])
            edge_outputs.append(channel_shuffle(torch.cat([mixed, rest], dim=1), edge.channel_divisor))
        return dispatch.mixed_sum(edge_outputs, node_plan.edge_weights, fused)

    def _zeros(self, states: list[torch.Tensor]) -> torch.Tensor:
        # A node whose every chosen op is `none`.
        ref = states[0]
        return ref[:, :, ::2, ::2].mul(0.0) if self.reduction else ref.mul(0.0)


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's fixed reduction block between stages."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2, affine: bool = True) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine)
        # ceil_mode: equal to NAS-Bench-201's pooling on even sizes, and matches conv_a's output on odd ones.
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), nn.Conv2d(C_in, C_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


def make_mixing(mixing: "str | MixingRule", space: CellSpace, genotype: Any = None, partial_k: int = 4,
                tau: float = 10.0) -> MixingRule:
    if isinstance(mixing, MixingRule):
        return mixing
    cls = MIXING.get(mixing)
    if cls is Fixed:
        if genotype is None:
            raise ValueError("mixing='fixed' needs a genotype")
        return Fixed(space.to_paths(genotype))
    if genotype is not None:
        raise ValueError(f"a genotype is only taken with mixing='fixed', not {mixing!r}")
    if mixing == "partial":
        return cls(partial_k)
    if mixing == "gumbel":
        return cls(tau)
    return cls()


class SearchNetwork(nn.Module):
    """The supernet of a cell space, as DARTS (darts) or NAS-Bench-201 (nb201) build it.

    `layers` counts all cells for darts (reductions at 1/3 and 2/3 of the depth) and the cells per
    stage for nb201 (its N; three stages joined by residual reduction blocks).
    Architecture parameters are registered as `alphas_<cell type>` (and `betas_<cell type>` for
    PC-DARTS edge normalisation), so a state_dict holds the architecture.
    `fused=True` (the default) computes mixed ops through `supernet.dispatch`: Triton kernels on CUDA,
    fused CPU paths elsewhere, with the reference path's numbers (`fused=False`); bench/README.md has
    the measurements.
    """

    def __init__(self, space: "str | CellSpace", C: int, layers: int, num_classes: int, in_channels: int = 3,
                 mixing: "str | MixingRule" = "softmax", genotype: Any = None, partial_k: int = 4,
                 tau: float = 10.0, stem_multiplier: int = 3, fused: bool = True) -> None:
        super().__init__()
        for name, value in (("C", C), ("layers", layers), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.space = get_space(space)
        self.mixing = make_mixing(mixing, self.space, genotype, partial_k, tau)
        self.C, self.layers, self.num_classes, self.in_channels = C, layers, num_classes, in_channels
        self.fused = fused
        k = self.mixing.channel_divisor
        if C % k:
            raise ValueError(f"mixing='partial' with k={k} cannot divide C={C} channels; choose C divisible by {k}")
        space_ = self.space
        self.nodes = range(space_.num_input_nodes, space_.num_input_nodes + space_.num_nodes)
        if space_.name == "nb201":
            self._build_nb201(C, layers, in_channels, k)
        else:
            self._build_darts(C, layers, in_channels, k, stem_multiplier)
        for ct in space_.cell_types:
            self.register_parameter(f"alphas_{ct}", nn.Parameter(1e-3 * torch.randn(space_.num_edges, len(space_.ops))))
            if self.mixing.name == "partial":
                self.register_parameter(f"betas_{ct}", nn.Parameter(1e-3 * torch.randn(space_.num_edges)))

    def _build_darts(self, C: int, layers: int, in_channels: int, k: int, stem_multiplier: int) -> None:
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
                if C_curr % k:
                    raise ValueError(f"mixing='partial' with k={k} cannot divide the {C_curr} channels of cell {i}")
            pre0 = FactorizedReduce(C_pp, C_curr, affine=False) if reduction_prev else \
                ReLUConvBN(C_pp, C_curr, 1, 1, 0, affine=False)
            pre1 = ReLUConvBN(C_prev, C_curr, 1, 1, 0, affine=False)
            self.cells.append(SearchCell(self.space, C_curr, reduction, k, [pre0, pre1]))
            reduction_prev = reduction
            C_pp, C_prev = C_prev, self.space.num_nodes * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, self.num_classes)

    def _build_nb201(self, C: int, N: int, in_channels: int, k: int) -> None:
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, C_stage in enumerate((C, 2 * C, 4 * C)):
            if stage:
                self.cells.append(ResNetBasicBlock(C_prev, C_stage, 2))
            for _ in range(N):
                self.cells.append(SearchCell(self.space, C_stage, False, k))
            C_prev = C_stage
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, self.num_classes)

    # --- architecture parameters ---------------------------------------------------------------
    def alphas(self, cell_type: str) -> torch.Tensor:
        return getattr(self, f"alphas_{cell_type}")

    def betas(self, cell_type: str) -> torch.Tensor:
        return getattr(self, f"betas_{cell_type}")

    def arch_parameters(self) -> list[nn.Parameter]:
        """alphas (and PC-DARTS betas), one per cell type."""
        names = [f"alphas_{ct}" for ct in self.space.cell_types]
        if self.mixing.name == "partial":
            names += [f"betas_{ct}" for ct in self.space.cell_types]
        return [getattr(self, n) for n in names]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def edge_strengths(self) -> dict[str, torch.Tensor]:
        """Per cell type, the (edges, ops) strengths that derivation ranks."""
        out = {}
        with torch.no_grad():
            for ct in self.space.cell_types:
                w = torch.softmax(self.alphas(ct), dim=-1)
                if self.mixing.name == "partial":
                    betas = self.betas(ct)
                    norm = torch.cat([torch.softmax(betas[list(self.space.node_edges(n))], dim=-1) for n in self.nodes])
                    w = w * norm[:, None]
                out[ct] = w
        return out

    def derive(self) -> Any:
        """The genotype by the space's published rule (a fixed network returns its own)."""
        if isinstance(self.mixing, Fixed):
            return self.space.from_paths(self.mixing.paths)
        return self.space.derive(self.edge_strengths())

    # --- forward ---------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input has shape {shape}; expected (batch, {self.in_channels}, height, width)")
        if not x.is_floating_point():
            raise ValueError(f"input has dtype {x.dtype}; expected a floating-point tensor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_plans(x, self.mixing.plan(self))

    def forward_plans(self, x: torch.Tensor, plans: dict[str, CellPlan]) -> torch.Tensor:
        s = self.stem(x)
        if self.space.num_input_nodes == 2:
            s0 = s1 = s
            for cell in self.cells:
                s0, s1 = s1, cell([s0, s1], plans[cell.cell_type], self.fused)
            s = s1
        else:
            for cell in self.cells:
                s = cell([s], plans[cell.cell_type], self.fused) if isinstance(cell, SearchCell) else cell(s)
            s = self.lastact(s)
        return self.classifier(self.global_pooling(s).flatten(1))

    # --- single paths ----------------------------------------------------------------------------
    def subnet(self, genotype: Any) -> "SubNetwork":
        """A view that runs only `genotype`'s paths with this network's (shared) weights."""
        return SubNetwork(self, genotype)

    def set_active(self, genotype: Any) -> None:
        """Pins the path that mixing='sample' trains (None: draw one per forward)."""
        if not isinstance(self.mixing, Sample):
            raise ValueError(f"set_active needs mixing='sample', not {self.mixing.name!r}")
        self.mixing.active = None if genotype is None else self.space.to_paths(genotype)

    def extra_repr(self) -> str:
        return f"space={self.space.name!r}, C={self.C}, layers={self.layers}, mixing={self.mixing!r}"


class SubNetwork(nn.Module):
    """One architecture inside a supernet: shares its weights and batch-norm buffers."""

    def __init__(self, network: SearchNetwork, genotype: Any) -> None:
        super().__init__()
        self.network = network
        self.genotype = network.space.validate(genotype)
        self.plans = Fixed(network.space.to_paths(self.genotype)).plan(network)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.network.check_input(x)
        return self.network.forward_plans(x, self.plans)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def preserved_batchnorm(model: nn.Module) -> Iterator[None]:
    """Restores every batch-norm buffer on exit (recalibrating a subnet overwrites the supernet's)."""
    saved = [(m, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in _batchnorms(model)]
    try:
        yield
    finally:
        for m, buffers in saved:
            for k, v in buffers.items():
                m._buffers[k].copy_(v)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Re-estimates batch-norm statistics on a few batches (as SPOS does), then sets eval mode."""
    bns = _batchnorms(model)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_batchnorm got no batches")
    return model.eval()
