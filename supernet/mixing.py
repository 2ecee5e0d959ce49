"""Mixing rules: how an edge's candidate ops combine into the edge's output.

A rule owns its options and properties. It declares the architecture tensors it learns
(`arch_shapes`) and turns them into a *plan* for one forward pass (`plan(space, arch)`): per cell
type, per intermediate node, which (edge, op) pairs run and with which weights. Cells then compute
only what the plan names, so `none` and unchosen candidates cost nothing.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .checks import integer, number
from .registry import Registry
from .spaces import CellSpace

# Architecture tensors by kind, then cell type: arch["alphas"]["normal"] is an (edges, ops) tensor.
Arch = Mapping[str, Mapping[str, torch.Tensor]]


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
    learns_alphas = True  # whether a search step should update the architecture tensors
    differentiable = False  # output a deterministic differentiable function of the alphas (torch.func)
    anneals_temperature = False  # the instance has a settable `.tau` that a schedule anneals
    channel_divisor = 1  # PC-DARTS runs candidates on 1/K of the channels
    decays_aux_skip = False  # the instance has a settable `.beta` (DARTS- auxiliary skip) that a schedule decays
    weights_every_candidate = False  # plans run every candidate with a weight, so perturbation-based selection
    #                                  can fix edges and leave candidates out (mixing.projected_plan)
    smooths_weight_step = False  # the instance has a settable `.epsilon` (SDARTS-RS noise) that a schedule grows,
    #                              and `perturbing()`, inside which forwards mix with perturbed weights

    def arch_shapes(self, space: CellSpace) -> dict[str, tuple[int, ...]]:
        """Shape of each architecture tensor kind the rule learns, per cell type."""
        return {"alphas": (space.num_edges, len(space.ops))}

    def plan(self, space: CellSpace, arch: Arch) -> dict[str, CellPlan]:
        """Per cell type, what each intermediate node computes in the next forward pass."""
        raise NotImplementedError

    def edge_strengths(self, space: CellSpace, arch: Arch) -> dict[str, torch.Tensor]:
        """Per cell type, the (edges, ops) strengths that derivation ranks."""
        return {ct: F.softmax(arch["alphas"][ct], dim=-1) for ct in space.cell_types}

    def mixing_distribution(self, space: CellSpace, arch: Arch) -> dict[str, torch.Tensor]:
        """Per cell type, the (edges, ops) distribution over each edge's candidates (rows sum to 1):
        what collapse diagnostics take the entropy of. Softmax(alpha) unless a rule says otherwise."""
        return {ct: F.softmax(arch["alphas"][ct], dim=-1) for ct in space.cell_types}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _dense_plan(space: CellSpace, weights: torch.Tensor, kept: torch.Tensor | None = None) -> CellPlan:
    """Every non-`none` op of every edge (of the `kept` (edges, ops) candidates, if given), weighted."""
    ops = [k for k, op in enumerate(space.ops) if op != "none"]
    keep = None if kept is None else kept.tolist()
    plan = []
    for node in space.intermediate_nodes:
        rows = list(space.node_edges(node))
        if keep is None:
            pairs = [(e, k) for e in rows for k in ops]
            plan.append(NodePlan(pairs, weights[rows][:, ops].reshape(-1)))
        else:
            pairs = [(e, k) for e in rows for k in ops if keep[e][k]]
            plan.append(NodePlan(pairs, weights[[e for e, _ in pairs], [k for _, k in pairs]]))
    return plan


def path_plan(space: CellSpace, path) -> CellPlan:
    """One op per used edge, unweighted (single-path training, fixed genotypes, subnets)."""
    none = space.ops.index("none")
    plan = []
    for node in space.intermediate_nodes:
        pairs = [(e, path[e]) for e in space.node_edges(node) if path[e] is not None and path[e] != none]
        plan.append(NodePlan(pairs, None))
    return plan


def projected_plan(space: CellSpace, plan: CellPlan, projected: Mapping[int, int], dropped: Collection[int] = (),
                   removed: tuple[int, int | None] | None = None) -> CellPlan:
    """A weighted plan after perturbation-based selection (DARTS-PT): each `projected` edge (edge -> op) runs
    its op alone with weight 1, `dropped` edges (inputs a node no longer takes) run nothing, and the `removed`
    (edge, op) candidate, or with op None the whole edge, is left out; every other weight stays as it is (not
    renormalised), as DARTS-PT masks candidates and edges to measure what the supernet loses."""
    def gone(e: int, k: int) -> bool:
        return e in dropped or (removed is not None and removed[0] == e and removed[1] in (None, k))

    out = []
    for node, node_plan in zip(space.intermediate_nodes, plan):
        if node_plan.weights is None or node_plan.residual is not None or node_plan.edge_weights is not None:
            raise ValueError("projecting edges needs a plan of weighted candidates (softmax or dirichlet mixing)")
        keep = [i for i, (e, k) in enumerate(node_plan.pairs) if e not in projected and not gone(e, k)]
        chosen = [(e, projected[e]) for e in space.node_edges(node)
                  if e in projected and space.ops[projected[e]] != "none" and not gone(e, projected[e])]
        weights = node_plan.weights[keep]
        if chosen:
            weights = torch.cat([weights, weights.new_ones(len(chosen))])
        out.append(NodePlan([node_plan.pairs[i] for i in keep] + chosen, weights))
    return out


@MIXING.register("softmax")
class Softmax(MixingRule):
    """DARTS: every candidate, weighted by softmax(alpha)."""

    name = "softmax"
    differentiable = True
    weights_every_candidate = True

    def plan(self, space, arch):
        return {ct: _dense_plan(space, self.mixing_weights(space, arch["alphas"][ct])) for ct in space.cell_types}

    def mixing_weights(self, space: CellSpace, alphas: torch.Tensor) -> torch.Tensor:
        """The (edges, ops) weights the next forward mixes with: softmax(alpha). Rules built on softmax
        (DARTS-, SDARTS-RS) adjust them here."""
        return F.softmax(alphas, dim=-1)


@MIXING.register("gumbel")
class Gumbel(MixingRule):
    """GDAS: a hard Gumbel-softmax sample per edge; only the sampled op runs.

    The forward value is exactly the chosen op's output. Gradients reach every alpha as in GDAS:
    the chosen op through `w * op(x)`, the others through a zero-valued sum of their hard weights.
    `tau` is set by the search loop's schedule (GDAS anneals it from 10 to 0.1).
    """

    name = "gumbel"
    anneals_temperature = True

    def __init__(self, tau: float = 10.0) -> None:
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = number("gumbel temperature tau", value, positive=True)

    def hard_sample(self, alphas: torch.Tensor, what: str = "alphas") -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through one-hot weights, chosen op index) per edge, drawn from Gumbel(alphas / tau)."""
        if not torch.isfinite(alphas).all():
            bad = int((~torch.isfinite(alphas)).sum())
            raise ValueError(f"gumbel mixing cannot sample from non-finite {what}: {bad} entries are nan or inf "
                             "(did the architecture step diverge?)")
        # An exponential draw of exactly 0 would make an infinite Gumbel; the clamp keeps every draw finite.
        exponential = torch.empty_like(alphas).exponential_().clamp_(min=torch.finfo(alphas.dtype).tiny)
        gumbels = -exponential.log()
        probs = F.softmax((alphas.log_softmax(dim=-1) + gumbels) / self.tau, dim=-1)
        if not torch.isfinite(probs).all():
            raise ValueError(f"gumbel mixing with tau={self.tau} gives non-finite probabilities for {what}; "
                             "use a larger tau")
        index = probs.argmax(dim=-1)
        one_hot = F.one_hot(index, alphas.shape[-1]).to(probs.dtype)
        # (p - p.detach()) is exactly zero, so the values are exactly one-hot.
        return (probs - probs.detach()) + one_hot, index

    def plan(self, space, arch):
        none = space.ops.index("none")
        plans = {}
        for ct in space.cell_types:
            hard, index = self.hard_sample(arch["alphas"][ct], f"alphas_{ct}")
            chosen = index.tolist()
            plan = []
            for node in space.intermediate_nodes:
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

    def plan(self, space, arch):
        paths = self.active
        if paths is None:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()))
            paths = space.to_paths(space.random_genotype(rng))
        return {ct: path_plan(space, paths[ct]) for ct in space.cell_types}


@MIXING.register("partial")
class Partial(MixingRule):
    """PC-DARTS: softmax mixing on 1/K of the channels, channel shuffle, and edge normalisation."""

    name = "partial"
    differentiable = True

    def __init__(self, k: int = 4) -> None:
        self.channel_divisor = integer("partial channel divisor k", k)

    def arch_shapes(self, space):
        # betas: one edge-normalisation weight per edge.
        return {"alphas": (space.num_edges, len(space.ops)), "betas": (space.num_edges,)}

    def _edge_weights(self, space: CellSpace, betas: torch.Tensor) -> list[torch.Tensor]:
        return [F.softmax(betas[list(space.node_edges(node))], dim=-1) for node in space.intermediate_nodes]

    def plan(self, space, arch):
        plans = {}
        for ct in space.cell_types:
            plan = _dense_plan(space, F.softmax(arch["alphas"][ct], dim=-1))
            for node_plan, edge_weights in zip(plan, self._edge_weights(space, arch["betas"][ct])):
                node_plan.edge_weights = edge_weights
            plans[ct] = plan
        return plans

    def edge_strengths(self, space, arch):
        strengths = super().edge_strengths(space, arch)
        return {ct: w * torch.cat(self._edge_weights(space, arch["betas"][ct]))[:, None]
                for ct, w in strengths.items()}

    def extra_repr(self):
        return f"k={self.channel_divisor}"


@MIXING.register("aux-skip")
class AuxSkip(Softmax):
    """DARTS-: softmax mixing plus an auxiliary skip connection beta * skip(x) on every edge.

    beta is not an architecture parameter: the search loop decays it linearly from 1 toward 0 over the epochs
    (`decays_aux_skip`). It rides on the skip candidate's weight (softmax(alpha)_skip + beta), so the
    edge computes sum_k softmax(alpha)_k op_k(x) + beta * skip(x); on a reduction edge skip is the space's
    strided skip (factorized reduce in the DARTS space), as in DARTS-.
    """

    name = "aux-skip"
    decays_aux_skip = True

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = number("auxiliary skip weight beta", value, non_negative=True)

    def mixing_weights(self, space, alphas):
        weights = super().mixing_weights(space, alphas)
        if not self.beta:
            return weights
        skip = space.ops.index("skip_connect")
        return weights + self.beta * F.one_hot(torch.tensor(skip), len(space.ops)).to(weights)

    def extra_repr(self):
        return f"beta={self.beta}"


@MIXING.register("random-smoothing")
class RandomSmoothing(Softmax):
    """SDARTS-RS: softmax mixing, except that the weight step mixes with randomly perturbed weights.

    Inside `perturbing()` (the search loop's weight step) every forward draws, per alpha entry, noise
    U(-epsilon, epsilon) from torch's global RNG (so seeds and checkpoints fix it) and mixes with
    clip(softmax(alpha) + noise): SDARTS's `clip` clamps each weight to [0, 1] and rescales each edge to sum 1;
    an edge clamped to all zeros puts 1 on its largest perturbed entry. The perturbed weights are constants,
    as in SDARTS, which writes them into the alphas' data. Everywhere else (the alpha step, evaluation,
    derivation) the weights are the unperturbed softmax(alpha). The search loop sets `epsilon` each epoch.
    """

    name = "random-smoothing"
    differentiable = False  # the weight step's forward draws noise
    smooths_weight_step = True

    def __init__(self, epsilon: float = 0.3) -> None:
        self.epsilon = epsilon
        self.perturb = False

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = number("random smoothing epsilon", value, non_negative=True)

    @contextlib.contextmanager
    def perturbing(self) -> Iterator[None]:
        """Forwards inside mix with perturbed weights."""
        self.perturb = True
        try:
            yield
        finally:
            self.perturb = False

    def perturbed(self, weights: torch.Tensor) -> torch.Tensor:
        """clip(weights + U(-epsilon, epsilon)), detached: each row a distribution over the edge's candidates."""
        noisy = weights.detach() + torch.empty_like(weights).uniform_(-self.epsilon, self.epsilon)
        clamped = noisy.clamp(0.0, 1.0)
        dead = clamped.sum(dim=-1, keepdim=True) == 0
        fallback = F.one_hot(noisy.argmax(dim=-1), noisy.shape[-1]).to(noisy)
        clamped = torch.where(dead, fallback, clamped)
        return clamped / clamped.sum(dim=-1, keepdim=True)

    def mixing_weights(self, space, alphas):
        weights = super().mixing_weights(space, alphas)
        return self.perturbed(weights) if self.perturb and self.epsilon else weights

    def extra_repr(self):
        return f"epsilon={self.epsilon}"


@MIXING.register("dirichlet")
class Dirichlet(MixingRule):
    """DrNAS: per edge a Dirichlet distribution over the candidates, concentration beta = elu(alpha) + 1.

    A search step's forward mixes with a reparameterised sample Dirichlet(beta).rsample() (drawn from
    torch's global RNG, so seeds and checkpoints fix it); evaluation and derivation use the mean
    beta / sum(beta). Which one a forward uses: `sample` True or False forces it; None (the default)
    samples exactly when autograd records (the search steps) and takes the mean under torch.no_grad()
    (validation accuracy and other evaluation).

    DrNAS's progressive search adds two things, both set by the search loop between its stages: candidates
    run on 1/`channel_divisor` of the channels (as PC-DARTS, without edge normalisation), and `kept`, per cell
    type an (edges, ops) bool mask, restricts each edge to its kept candidates: the sample and the mean are
    zeroed outside them and renormalised (for a sample this is exactly Dirichlet over the kept concentrations,
    as DrNAS's code masks it), and pruned candidates do not run.
    """

    name = "dirichlet"
    differentiable = False  # a sample per forward
    weights_every_candidate = True

    def __init__(self, channel_divisor: int = 1) -> None:
        self.sample: bool | None = None
        self.channel_divisor = integer("dirichlet channel divisor", channel_divisor)
        self.kept: dict[str, torch.Tensor] | None = None  # on the CPU, whatever the network's device

    @staticmethod
    def concentration(alphas: torch.Tensor) -> torch.Tensor:
        return F.elu(alphas) + 1

    @staticmethod
    def _restricted(weights: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        if kept is None:
            return weights
        weights = weights * kept.to(weights)
        return weights / weights.sum(dim=-1, keepdim=True)

    def mean(self, alphas: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        beta = self.concentration(alphas)
        return self._restricted(beta / beta.sum(dim=-1, keepdim=True), kept)

    def weights(self, alphas: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        sample = torch.is_grad_enabled() if self.sample is None else self.sample
        if not sample:
            return self.mean(alphas, kept)
        if not torch.isfinite(alphas).all():
            raise ValueError("dirichlet mixing cannot sample from non-finite alphas (did the architecture step "
                             "diverge?)")
        drawn = torch.distributions.Dirichlet(self.concentration(alphas.float())).rsample()
        return self._restricted(drawn, kept).to(alphas.dtype)

    def _kept(self, cell_type: str) -> torch.Tensor | None:
        return None if self.kept is None else self.kept[cell_type]

    def plan(self, space, arch):
        return {ct: _dense_plan(space, self.weights(arch["alphas"][ct], self._kept(ct)), self._kept(ct))
                for ct in space.cell_types}

    def edge_strengths(self, space, arch):
        return self.mixing_distribution(space, arch)

    def mixing_distribution(self, space, arch):
        return {ct: self.mean(arch["alphas"][ct], self._kept(ct)) for ct in space.cell_types}

    def extra_repr(self):
        parts = [f"k={self.channel_divisor}"] if self.channel_divisor > 1 else []
        if self.kept is not None:
            parts.append("candidates pruned")
        return ", ".join(parts)


@MIXING.register("fixed")
class Fixed(MixingRule):
    """A given genotype: each edge runs its chosen op, unweighted."""

    name = "fixed"
    learns_alphas = False

    def __init__(self, paths) -> None:
        self.paths = paths

    def plan(self, space, arch):
        return {ct: path_plan(space, self.paths[ct]) for ct in space.cell_types}


def make_mixing(mixing: "str | MixingRule", space: CellSpace, genotype: Any = None, partial_k: int = 4,
                tau: float = 10.0) -> MixingRule:
    """The rule registered as `mixing`, built from the options it takes (a rule passes through)."""
    if isinstance(mixing, MixingRule):
        return mixing
    cls = MIXING.get(mixing)
    if cls is Fixed:
        if genotype is None:
            raise ValueError("mixing='fixed' needs a genotype")
        return Fixed(space.to_paths(genotype))
    if genotype is not None:
        raise ValueError(f"a genotype is only taken with mixing='fixed', not {mixing!r}")
    if cls is Partial:
        return Partial(partial_k)
    if cls is Gumbel:
        return Gumbel(tau)
    return cls()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleaves `groups` channel groups: channel g * (c / groups) + i moves to i * groups + g."""
    return rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)
