"""The weight-sharing search network (supernet) for any registered cell space."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import batched_cell, dispatch
from .checks import images, integer
from .mixing import CellPlan, Dirichlet, Fixed, MixingRule, Sample, channel_shuffle, make_mixing, projected_plan
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
        self.cell_type = space.cell_type(reduction)
        for i, module in enumerate(preprocess or []):
            self.add_module(f"preprocess{i}", module)
        self.edges = nn.ModuleList(
            MixedEdge(space, C, 2 if reduction and src < space.num_input_nodes else 1, channel_divisor)
            for _, src in space.edges
        )

    def forward(self, inputs: list[torch.Tensor], plan: CellPlan, fused: bool) -> torch.Tensor:
        space = self.space
        states = [getattr(self, f"preprocess{i}", nn.Identity())(x) for i, x in enumerate(inputs)]
        if fused and batched_cell.applies(self, plan, states[0]):  # the CPU fast path: per state, channels_last
            return batched_cell.cell_output(space, states + batched_cell.cell_nodes(self, states, plan))
        for node, node_plan in zip(space.intermediate_nodes, plan):
            if node_plan.edge_weights is not None or self.edges[0].channel_divisor > 1:
                s = self._partial_node(node, node_plan, states, fused)
            else:
                outputs = [o for e, ks in dispatch.group_by_edge(node_plan.pairs)
                           for o in dispatch.edge_outputs(self.edges[e].ops, states[space.edges[e][1]],
                                                          [space.ops[k] for k in ks], fused)]
                s = dispatch.mixed_sum(outputs, node_plan.weights, fused) if outputs else self._zeros(states)
            if node_plan.residual is not None:
                s = s + node_plan.residual
            states.append(s)
        return space.cell_output(states)

    def _partial_node(self, node: int, node_plan, states, fused: bool) -> torch.Tensor:
        space = self.space
        edge_outputs = []
        for e in space.node_edges(node):
            edge = self.edges[e]
            x = states[space.edges[e][1]]
            c = x.shape[1] // edge.channel_divisor
            mine = [(i, k) for i, (pe, k) in enumerate(node_plan.pairs) if pe == e]
            if mine:
                outputs = dispatch.edge_outputs(edge.ops, x[:, :c], [space.ops[k] for _, k in mine], fused)
                mixed = dispatch.mixed_sum(outputs, node_plan.weights[[i for i, _ in mine]], fused)
            else:  # every candidate left on the edge is `none` (DrNAS's pruning may keep only it and pools)
                mixed = x[:, :c, ::edge.stride, ::edge.stride].mul(0.0)
            rest = x[:, c:] if edge.stride == 1 else edge.bypass(x[:, c:])
            edge_outputs.append(channel_shuffle(torch.cat([mixed, rest], dim=1), edge.channel_divisor))
        return dispatch.mixed_sum(edge_outputs, node_plan.edge_weights, fused)

    def _zeros(self, states: list[torch.Tensor]) -> torch.Tensor:
        # A node whose every chosen op is `none`.
        ref = states[0]
        return ref[:, :, ::2, ::2].mul(0.0) if self.reduction else ref.mul(0.0)


def _check_widenable(op: nn.Module) -> None:
    """ValueError unless `widen_partial_channels` can widen the candidate: plain convolutions, each batch norm
    non-affine and after one (the nb201 space's ops)."""
    after_conv = False
    for m in op.modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise ValueError(f"widening partial channels supports plain convolutions (the nb201 space's), not {m}")
            after_conv = True
        elif isinstance(m, nn.BatchNorm2d) and (m.affine or not after_conv):
            raise ValueError(f"widening partial channels needs every batch norm ({m}) to be non-affine and after a "
                             "convolution (the nb201 space's ops)")


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


def cell_preprocess(inputs: list[tuple[int, int]], C: int, affine: bool) -> list[nn.Module]:
    """Per cell input (channels, reductions so far): a module bringing it to C channels at the newest resolution.

    An input one reduction behind the newest (the cell before a reduction cell) is factorized-reduced.
    """
    newest = inputs[-1][1]
    return [FactorizedReduce(C_in, C, affine=affine) if reductions < newest else ReLUConvBN(C_in, C, 1, 1, 0, affine)
            for C_in, reductions in inputs]


class SearchNetwork(nn.Module):
    """The supernet of a cell space, built on the skeleton the space declares (`space.blocks`).

    `layers` counts all cells for darts (reductions at 1/3 and 2/3 of the depth) and the cells per
    stage for nb201 (its N; three stages joined by residual reduction blocks). `stem_multiplier`
    defaults to the space's (darts 3, nb201 1).
    Architecture tensors are registered as `<kind>_<cell type>` (`alphas_normal`; PC-DARTS adds
    `betas_<cell type>` for edge normalisation), so a state_dict holds the architecture.
    `fused=True` (the default) computes mixed ops through `supernet.dispatch`: Triton kernels on CUDA,
    fused CPU paths elsewhere, with the reference path's numbers (`fused=False`); bench/README.md has
    the measurements.
    """

    def __init__(self, space: "str | CellSpace", C: int, layers: int, num_classes: int, in_channels: int = 3,
                 mixing: "str | MixingRule" = "softmax", genotype: Any = None, partial_k: int = 4,
                 tau: float = 10.0, stem_multiplier: int | None = None, fused: bool = True) -> None:
        super().__init__()
        for name, value in (("C", C), ("layers", layers), ("num_classes", num_classes), ("in_channels", in_channels)):
            integer(name, value)
        self.space = get_space(space)
        stem_multiplier = integer("stem_multiplier", self.space.stem_multiplier if stem_multiplier is None
                                  else stem_multiplier)
        self.mixing = make_mixing(mixing, self.space, genotype, partial_k, tau)
        self.C, self.layers, self.num_classes, self.in_channels = C, layers, num_classes, in_channels
        self.fused = fused
        self._removed: tuple[str, int, int | None] | None = None  # a candidate left out (without_candidate)
        k = self.mixing.channel_divisor
        if C % k:  # every cell has a multiple of C channels
            raise ValueError(f"mixing='partial' with k={k} cannot divide C={C} channels; choose C divisible by {k}")
        self._build(C, layers, in_channels, k, stem_multiplier)
        for ct in self.space.cell_types:
            for kind, shape in self.mixing.arch_shapes(self.space).items():
                self.register_parameter(f"{kind}_{ct}", nn.Parameter(1e-3 * torch.randn(shape)))

    def _build(self, C: int, layers: int, in_channels: int, k: int, stem_multiplier: int) -> None:
        space = self.space
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        self.cells = nn.ModuleList()
        # The states a cell reads: the newest num_input_nodes outputs, as (channels, reductions so far).
        inputs = [(C_stem, 0)] * space.num_input_nodes
        for block in space.blocks(C, layers):
            if block.kind == "residual":
                self.cells.append(ResNetBasicBlock(inputs[-1][0], block.channels, 2))
                C_out = block.channels
            else:
                preprocess = cell_preprocess(inputs, block.channels, affine=False) if space.preprocess_inputs else None
                self.cells.append(SearchCell(space, block.channels, block.reduction, k, preprocess))
                C_out = len(space.output_nodes) * block.channels
            inputs = (inputs + [(C_out, inputs[-1][1] + block.reduction)])[-space.num_input_nodes:]
        if space.final_activation:
            self.lastact = nn.Sequential(nn.BatchNorm2d(inputs[-1][0]), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(inputs[-1][0], self.num_classes)

    # --- architecture parameters ---------------------------------------------------------------
    def alphas(self, cell_type: str) -> torch.Tensor:
        return getattr(self, f"alphas_{cell_type}")

    def betas(self, cell_type: str) -> torch.Tensor:
        return getattr(self, f"betas_{cell_type}")

    def architecture(self) -> dict[str, dict[str, torch.Tensor]]:
        """The architecture tensors the mixing rule plans from: {kind: {cell type: tensor}}."""
        kinds = self.mixing.arch_shapes(self.space)
        return {kind: {ct: getattr(self, f"{kind}_{ct}") for ct in self.space.cell_types} for kind in kinds}

    def arch_parameters(self) -> list[nn.Parameter]:
        """alphas (and PC-DARTS betas), one per cell type."""
        return [t for tensors in self.architecture().values() for t in tensors.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def edge_strengths(self) -> dict[str, torch.Tensor]:
        """Per cell type, the (edges, ops) strengths that derivation ranks: a projected edge's row is one-hot, a
        dropped edge's zero."""
        with torch.no_grad():
            strengths = self.mixing.edge_strengths(self.space, self.architecture())
            for ct, chosen in self.projected_edges().items():
                for e, k in chosen.items():
                    strengths[ct][e] = F.one_hot(torch.tensor(k), len(self.space.ops)).to(strengths[ct])
            for ct, dropped in self.dropped_edges().items():
                strengths[ct][sorted(dropped)] = 0.0
            return strengths

    # --- perturbation-based selection (DARTS-PT): projected and dropped edges, a candidate left out ------
    def _state_buffer(self, name: str, initial: torch.Tensor) -> torch.Tensor:
        """The buffer `name`, registered as `initial` on the alphas' device on first use: architecture state that
        only some searches make (DrNAS's pruning and widening, DARTS-PT's projections), held by the state_dict."""
        if name not in self._buffers:
            self.register_buffer(name, initial.to(self.alphas(self.space.cell_types[0]).device))
        return self._buffers[name]

    def _selection_buffer(self, kind: str, cell_type: str) -> torch.Tensor:
        """The (edges,) buffer `projected_<cell type>` (op per edge, -1: open) or `dropped_<cell type>` (bool)."""
        initial = torch.full((self.space.num_edges,), -1) if kind == "projected" else \
            torch.zeros(self.space.num_edges, dtype=torch.bool)
        return self._state_buffer(f"{kind}_{cell_type}", initial)

    def _check_edge(self, cell_type: str, edge: int, projecting: bool) -> None:
        if not self.mixing.weights_every_candidate or self.mixing.channel_divisor > 1:
            raise ValueError(f"projecting edges needs softmax-weighted or dirichlet mixing on all channels, not "
                             f"{self.mixing!r}")
        if cell_type not in self.space.cell_types:
            raise ValueError(f"unknown cell type {cell_type!r}; expected one of {list(self.space.cell_types)}")
        if not 0 <= edge < self.space.num_edges:
            raise ValueError(f"edge {edge} out of range: the {self.space.name} cell has {self.space.num_edges} edges")
        if edge in self.dropped_edges().get(cell_type, ()):
            raise ValueError(f"edge {edge} of the {cell_type} cell is dropped already")
        if projecting and edge in self.projected_edges().get(cell_type, {}):
            raise ValueError(f"edge {edge} of the {cell_type} cell is projected already")

    def project_edge(self, cell_type: str, edge: int, op: int) -> None:
        """Fixes `edge` of `cell_type` to candidate `op`: from now on it runs that op alone with weight 1, and
        derivation takes it. Kept in the buffer `projected_<cell type>` (-1: not projected)."""
        self._check_edge(cell_type, edge, projecting=True)
        if not 0 <= op < len(self.space.ops):
            raise ValueError(f"op {op} out of range: an edge has {len(self.space.ops)} candidates")
        self._selection_buffer("projected", cell_type)[edge] = op

    def drop_edge(self, cell_type: str, edge: int) -> None:
        """Removes `edge` of `cell_type` (projected or not) from the cell, its node keeping its other inputs: it
        runs nothing from now on, and derivation never takes it. Kept in the bool buffer `dropped_<cell type>`."""
        self._check_edge(cell_type, edge, projecting=False)
        self._selection_buffer("dropped", cell_type)[edge] = True

    def projected_edges(self) -> dict[str, dict[int, int]]:
        """Per cell type with projections, {edge: op} of its projected edges."""
        out = {}
        for ct in self.space.cell_types:
            chosen = self._buffers.get(f"projected_{ct}")
            if chosen is not None:
                out[ct] = {e: k for e, k in enumerate(chosen.tolist()) if k >= 0}
        return out

    def dropped_edges(self) -> dict[str, set[int]]:
        """Per cell type with dropped edges, the set of them."""
        return {ct: {e for e, d in enumerate(self._buffers[f"dropped_{ct}"].tolist()) if d}
                for ct in self.space.cell_types if f"dropped_{ct}" in self._buffers}

    @contextlib.contextmanager
    def without_candidate(self, cell_type: str, edge: int, op: int | None) -> Iterator[None]:
        """Forwards inside leave candidate `op` of `edge` out, or with op None the whole edge, the other weights
        unchanged (DARTS-PT's masks)."""
        self._removed = (cell_type, edge, op)
        try:
            yield
        finally:
            self._removed = None

    # --- DrNAS's progressive search: pruned candidates, wider partial channels ------------------------
    def restrict_candidates(self, kept: dict[str, torch.Tensor]) -> None:
        """Limits each edge to its kept candidates: per cell type an (edges, ops) bool mask. The masks are
        also buffers `kept_<cell type>`, so a state_dict holds them and `load_state_dict` restores them."""
        if not isinstance(self.mixing, Dirichlet):
            raise ValueError(f"pruning candidates needs mixing='dirichlet', not {self.mixing.name!r}")
        shape = (self.space.num_edges, len(self.space.ops))
        masks = {}
        for ct in self.space.cell_types:
            mask = torch.as_tensor(kept[ct]).cpu()
            if mask.dtype != torch.bool or tuple(mask.shape) != shape or not mask.any(dim=-1).all():
                raise ValueError(f"kept candidates of {ct!r} must be a {shape} bool mask with at least one "
                                 f"candidate per edge, got {mask.dtype} {tuple(mask.shape)}")
            masks[ct] = mask
            self._state_buffer(f"kept_{ct}", mask).copy_(mask)
        self.mixing.kept = masks

    def prune_candidates(self, num_keep: int) -> dict[str, torch.Tensor]:
        """Keeps the `num_keep` strongest candidates of each edge (DrNAS: the top-k alphas, the same order as
        the Dirichlet mean's); returns the masks."""
        integer("num_keep", num_keep)
        if num_keep > len(self.space.ops):
            raise ValueError(f"num_keep={num_keep} exceeds the {len(self.space.ops)} candidates of an edge")
        kept = {}
        for ct, strengths in self.edge_strengths().items():
            index = strengths.detach().float().cpu().topk(num_keep, dim=-1).indices
            kept[ct] = torch.zeros(strengths.shape, dtype=torch.bool).scatter_(1, index, True)
        self.restrict_candidates(kept)
        return kept

    def widen_partial_channels(self, k: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Candidates see 1/k of the channels instead of 1/K (k < K). As DrNAS (net2wider), every convolution
        gains copies of randomly chosen input and output channels (torch's global RNG), each batch norm
        (statistics too) copies of its convolution's new output channels, and `optimizer`'s momentum buffers
        the same copies (a conv bias those of its output channels), so training continues from the narrower
        network's weights."""
        old = self.mixing.channel_divisor
        integer("partial channel divisor k", k)
        if not isinstance(self.mixing, Dirichlet) or old % k or k == old:
            raise ValueError(f"widening partial channels needs mixing='dirichlet' and a divisor k={k} that "
                             f"divides and is below the current {old}")
        state = optimizer.state if optimizer is not None else {}

        def grow(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor.index_select(dim, index.to(tensor.device))], dim=dim)

        def widen(param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
            param.data = grow(param.data, dim, index)
            param.grad = None  # of the narrower shape
            buffer = state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                state[param]["momentum_buffer"] = grow(buffer, dim, index)

        edges = [edge for cell in self.cells if isinstance(cell, SearchCell) for edge in cell.edges]
        for op in (op for edge in edges for op in edge.ops.values()):  # check all before changing any
            _check_widenable(op)
        for edge in edges:
            for op in edge.ops.values():
                out_index = None
                for m in op.modules():
                    if isinstance(m, nn.Conv2d):
                        in_index = torch.randint(0, m.in_channels, (m.in_channels * old // k - m.in_channels,))
                        widen(m.weight, 1, in_index)
                        out_index = torch.randint(0, m.out_channels, (m.out_channels * old // k - m.out_channels,))
                        widen(m.weight, 0, out_index)
                        if m.bias is not None:  # NB201's convs keep a bias where the batch norm has no shift
                            widen(m.bias, 0, out_index)
                        m.in_channels, m.out_channels = m.weight.shape[1], m.weight.shape[0]
                    elif isinstance(m, nn.BatchNorm2d):
                        for name in ("running_mean", "running_var"):
                            if getattr(m, name) is not None:
                                setattr(m, name, grow(getattr(m, name), 0, out_index))
                        m.num_features = m.num_features * old // k
            edge.channel_divisor = k
        self.mixing.channel_divisor = k
        self._state_buffer("channel_divisor", torch.tensor(k)).fill_(k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, after taking on the structure a progressive DrNAS state holds (pruned candidates, wider
        partial channels), so a checkpoint of either stage loads into a freshly built network."""
        # in the order the search makes them, so the buffers keep the order of the run that saved them
        if all(f"kept_{ct}" in state_dict for ct in self.space.cell_types):
            self.restrict_candidates({ct: state_dict[f"kept_{ct}"].bool() for ct in self.space.cell_types})
        if "channel_divisor" in state_dict and int(state_dict["channel_divisor"]) != self.mixing.channel_divisor:
            with torch.random.fork_rng(devices=[]):  # the widening's draws are overwritten: leave the RNG be
                self.widen_partial_channels(int(state_dict["channel_divisor"]))
        for ct in self.space.cell_types:  # projected and dropped edges (perturbation-based selection)
            for kind in ("projected", "dropped"):
                if f"{kind}_{ct}" in state_dict:
                    self._selection_buffer(kind, ct)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def derive(self) -> Any:
        """The genotype by the space's published rule (a fixed network returns its own)."""
        if isinstance(self.mixing, Fixed):
            return self.space.from_paths(self.mixing.paths)
        return self.space.derive(self.edge_strengths())

    # --- forward ---------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is a (batch, in_channels, H, W) tensor of the parameters' dtype."""
        images(x, self.in_channels, dtype=self.stem[0].weight.dtype)

    def plans(self) -> dict[str, CellPlan]:
        """The mixing rule's plan for the next forward pass (with the projections and a left-out candidate)."""
        plans = self.mixing.plan(self.space, self.architecture())
        projected, dropped, removed = self.projected_edges(), self.dropped_edges(), self._removed
        if not projected and not dropped and removed is None:
            return plans
        return {ct: projected_plan(self.space, plan, projected.get(ct, {}), dropped.get(ct, set()),
                                   removed[1:] if removed is not None and removed[0] == ct else None)
                for ct, plan in plans.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_plans(x, self.plans())

    def forward_plans(self, x: torch.Tensor, plans: dict[str, CellPlan]) -> torch.Tensor:
        """Logits of x when each cell computes what `plans` names."""
        if self.fused and self.training and batched_cell.serves(x):
            x = batched_cell.to_channels_last(x)  # the batched cells keep channels_last (supernet.batched_cell)
        states = [self.stem(x)] * self.space.num_input_nodes  # the newest outputs a cell reads
        for cell in self.cells:
            out = cell(states, plans[cell.cell_type], self.fused) if isinstance(cell, SearchCell) else cell(states[-1])
            states = (states + [out])[1:]
        s = self.lastact(states[-1]) if self.space.final_activation else states[-1]
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
        self.plans = Fixed(network.space.to_paths(self.genotype)).plan(network.space, {})

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
