"""Mixing rules: how an edge's candidate ops combine into the edge's output.

A rule turns a network's architecture parameters into a *plan* for one forward pass: per cell type,
per intermediate node, which (edge, op) pairs run and with which weights. Cells then compute only
what the plan names, so `none` and unchosen candidates cost nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .registry import Registry

if TYPE_CHECKING:
    from .search_network import SearchNetwork


@dataclass
class NodePlan:
    """What one intermediate node computes: sum over `pairs` of weight * op_k(input_e)."""

    pairs: list[tuple[int, int]]  # (edge row, op index); `none` never appears
    weights: torch.Tensor | None  # (len(pairs),) or None for an unweighted sum
    residual: torch.Tensor | None = None  # 0-d, zero in value: straight-through gradient carrier
    edge_weights: torch.Tensor | None = None  # PC-DARTS edge normalisation, per incoming edge


CellPlan = list[NodePlan]
MIXING: Registry[type["MixingRule"]] = Registry("mixing rule")


class MixingRule:
    """Base class; subclasses set `name` and implement `plan`."""

    name: str
    learns_alphas = True  # whether a search step should update the alphas
    channel_divisor = 1  # PC-DARTS runs candidates on 1/K of the channels

    def plan(self, net: "SearchNetwork") -> dict[str, CellPlan]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _dense_plan(net: "SearchNetwork", weights: torch.Tensor) -> CellPlan:
    """Every non-`none` op of every edge, weighted."""
    space = net.space
    ops = [k for k, op in enumerate(space.ops) if op != "none"]
    plan = []
    for node in net.nodes:
        rows = list(space.node_edges(node))
        pairs = [(e, k) for e in rows for k in ops]
        plan.append(NodePlan(pairs, weights[rows][:, ops].reshape(-1)))
    return plan


def path_plan(net: "SearchNetwork", path) -> CellPlan:
    """One op per used edge, unweighted (single-path training, fixed genotypes, subnets)."""
    none = net.space.ops.index("none")
    plan = []
    for node in net.nodes:
        pairs = [(e, path[e]) for e in net.space.node_edges(node) if path[e] is not None and path[e] != none]
        plan.append(NodePlan(pairs, None))
    return plan


@MIXING.register("softmax")
class Softmax(MixingRule):
    """DARTS: every candidate, weighted by softmax(alpha)."""

    name = "softmax"

    def plan(self, net):
        return {ct: _dense_plan(net, F.softmax(net.alphas(ct), dim=-1)) for ct in net.space.cell_types}


@MIXING.register("gumbel")
class Gumbel(MixingRule):
    """GDAS: a hard Gumbel-softmax sample per edge; only the sampled op runs.

    The forward value is exactly the chosen op's output. Gradients reach every alpha as in GDAS:
    the chosen op through `w * op(x)`, the others through a zero-valued sum of their hard weights.
    `tau` is set by the search loop's schedule (GDAS anneals it from 10 to 0.1).
    """

    name = "gumbel"

    def __init__(self, tau: float = 10.0) -> None:
        self.tau = tau

    def hard_sample(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            gumbels = -torch.empty_like(alphas).exponential_().log()
            probs = F.softmax((alphas.log_softmax(dim=-1) + gumbels) / self.tau, dim=-1)
            if torch.isfinite(gumbels).all() and torch.isfinite(probs).all():
                break
        index = probs.argmax(dim=-1)
        one_hot = F.one_hot(index, alphas.shape[-1]).to(probs.dtype)
        # (p - p.detach()) is exactly zero, so the values are exactly one-hot.
        return (probs - probs.detach()) + one_hot, index

    def plan(self, net):
        space = net.space
        none = space.ops.index("none")
        plans = {}
        for ct in space.cell_types:
            hard, index = self.hard_sample(net.alphas(ct))
            chosen = index.tolist()
            plan = []
            for node in net.nodes:
                rows = list(space.node_edges(node))
                pairs = [(e, chosen[e]) for e in rows if chosen[e] != none]
                weights = hard[[e for e, _ in pairs], [k for _, k in pairs]] if pairs else None
                others = torch.ones_like(hard[rows]).scatter_(1, index[rows, None], 0.0)
                plan.append(NodePlan(pairs, weights, residual=(hard[rows] * others).sum()))
            plans[ct] = plan
        return plans

    def extra_repr(self):
        return f"tau={self.tau}"


@MIXING.register("sample")
class Sample(MixingRule):
    """Single path (SPOS, ENAS, RSPS): a uniformly drawn architecture per forward; only it runs.

    Draws come from torch's global RNG, so `torch.manual_seed` fixes them and checkpoints of the
    RNG state resume them. `net.set_active(genotype)` pins a path instead.
    """

    name = "sample"
    learns_alphas = False

    def __init__(self) -> None:
        self.active = None

    def plan(self, net):
        paths = self.active
        if paths is None:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()))
            paths = net.space.to_paths(net.space.random_genotype(rng))
        return {ct: path_plan(net, paths[ct]) for ct in net.space.cell_types}


@MIXING.register("partial")
class Partial(MixingRule):
    """PC-DARTS: softmax mixing on 1/K of the channels, channel shuffle, and edge normalisation."""

    name = "partial"

    def __init__(self, k: int = 4) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"partial channel divisor k must be a positive integer, got {k!r}")
        self.channel_divisor = k

    def plan(self, net):
        plans = {}
        for ct in net.space.cell_types:
            plan = _dense_plan(net, F.softmax(net.alphas(ct), dim=-1))
            betas = net.betas(ct)
            for node, node_plan in zip(net.nodes, plan):
                node_plan.edge_weights = F.softmax(betas[list(net.space.node_edges(node))], dim=-1)
            plans[ct] = plan
        return plans

    def extra_repr(self):
        return f"k={self.channel_divisor}"


@MIXING.register("fixed")
class Fixed(MixingRule):
    """A given genotype: each edge runs its chosen op, unweighted."""

    name = "fixed"
    learns_alphas = False

    def __init__(self, paths) -> None:
        self.paths = paths

    def plan(self, net):
        return {ct: path_plan(net, self.paths[ct]) for ct in net.space.cell_types}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)
