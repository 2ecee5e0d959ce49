"""Meta-learning a SearchNetwork's weights and architecture parameters across tasks (MetaNAS-style).

The inner loop adapts weights and alphas to a task's support set by plain gradient steps, with
separate learning rates for the two. It runs through the network's functional form
(`torch.func.functional_call` + `torch.func.grad`), vectorised over the tasks of a meta-batch with
`torch.func.vmap`. Methods:

    maml     second-order MAML (Finn et al. 2017): the meta-gradient flows through the inner loop.
    fomaml   first-order MAML: the query-loss gradient at the adapted parameters.
    reptile  Reptile (Nichol et al. 2018), as MetaNAS (Elsken et al. 2020) applies it to weights and
             alphas: theta <- theta + meta_lr * (mean over tasks of adapted theta - theta).

Batch norm is per task, as in MAML: batch statistics on support and query sets alike, and every
task gets its own copy of the running buffers, which are then dropped, so nothing leaks between tasks.

Two paths compute these numbers. The reference path (`maml_meta_gradient`, `adapt_tasks`) vmaps
`functional_call` of any module over the tasks; the folded path (`folded_meta_gradient`,
`folded_adapt_tasks`) runs every task of a stack in one pass of `supernet.meta.folded` (2.1x faster a
meta-step, bench/bench_meta_step.py) and is what a MetaLearner uses wherever it covers the network
(nb201 with softmax mixing).
tests/test_meta_learner.py holds the folded path to the reference path.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .. import checks
from ..devices import resolve_device
from ..mixing import MIXING
from ..search_network import SearchNetwork
from .episodes import Episode, stack_episodes
from .folded import TaskFoldedNetwork, unsupported

Params = dict[str, torch.Tensor]
METHODS = ("maml", "fomaml", "reptile")
# No useful rate comes near it, and far above it float32 steps overflow (Adam's step of rate / (1 - beta1)
# cannot even be converted to float32 above about 3e37, and torch then raises from inside the optimizer).
MAX_LEARNING_RATE = 1e6


class NonFiniteUpdate(ValueError):
    """A meta-step met a NaN or infinite loss, gradient or weight; the network was left as it was."""


# --- the functional core (any nn.Module) ------------------------------------------------------
def task_buffers(buffers: Params, tasks: int | None = None) -> Params:
    """Private copies of the buffers: one set, or `tasks` sets stacked along a leading dimension."""
    if tasks is None:
        return {k: v.detach().clone() for k, v in buffers.items()}
    return {k: v.detach().expand(tasks, *v.shape).clone() for k, v in buffers.items()}


def functional_loss(model: nn.Module, params: Params, frozen: Params, buffers: Params, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) of `model` run with the given parameters and buffers."""
    logits = functional_call(model, (params, frozen, buffers), (x,))
    return F.cross_entropy(logits, y), (logits.argmax(dim=-1) == y).float().mean()


def inner_loop(model: nn.Module, params: Params, frozen: Params, buffers: Params, x: torch.Tensor,
               y: torch.Tensor, lrs: dict[str, float], steps: int) -> Params:
    """`steps` gradient steps on the support loss from `params`, each parameter with its own rate.

    Differentiable: under an outer `torch.func.grad` the result carries second-order terms.
    """
    def loss(p: Params, b: Params) -> torch.Tensor:
        # the buffers go in as an argument: a grad transform may not mutate captured tensors
        return functional_loss(model, p, frozen, b, x, y)[0]

    for _ in range(steps):
        grads = grad(loss)(params, buffers)
        params = {k: p - lrs[k] * grads[k] for k, p in params.items()}
    return params


def maml_meta_gradient(model: nn.Module, params: Params, frozen: Params, buffers: Params, episodes: Episode,
                       lrs: dict[str, float], steps: int, first_order: bool = False) -> tuple[Params, dict]:
    """Mean over the stacked tasks of d(query loss after adaptation)/d(params), and query loss/accuracy.

    Second order differentiates through the inner loop; first order takes the query-loss gradient
    at the adapted parameters as the meta-gradient (the inner gradients treated as constants).
    """
    tasks = episodes.num_tasks
    bufs = task_buffers(buffers, tasks)
    data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)

    if first_order:
        def adapt(b, sx, sy):
            return inner_loop(model, params, frozen, b, sx, sy, lrs, steps)

        def query(p, b, qx, qy):
            loss, acc = functional_loss(model, p, frozen, b, qx, qy)
            return loss, (loss, acc)

        adapted = vmap(adapt)(bufs, data[0], data[1])
        task_grads, (losses, accs) = vmap(grad(query, has_aux=True))(adapted, bufs, data[2], data[3])
        meta_grads = {k: g.mean(dim=0) for k, g in task_grads.items()}
    else:
        def task_loss(p, b, sx, sy, qx, qy):
            adapted = inner_loop(model, p, frozen, b, sx, sy, lrs, steps)
            loss, acc = functional_loss(model, adapted, frozen, b, qx, qy)
            return loss, (loss, acc)

        # vmap(grad(...)), not grad(vmap(...)): in torch 2.x the latter gets the second-order terms of
        # affine batch norm wrong (off by about 1% here), while per-task gradients match autograd exactly.
        task_grads, (losses, accs) = vmap(grad(task_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0))(
            params, bufs, *data)
        meta_grads = {k: g.mean(dim=0) for k, g in task_grads.items()}
    return meta_grads, {"query_loss": losses.detach().mean().item(), "query_accuracy": accs.mean().item()}


def adapt_tasks(model: nn.Module, params: Params, frozen: Params, buffers: Params, episodes: Episode,
                lrs: dict[str, float], steps: int) -> tuple[Params, dict]:
    """Adapted parameters per stacked task (leading dimension), and their query loss and accuracy per task."""
    bufs = task_buffers(buffers, episodes.num_tasks)

    def one(b, sx, sy, qx, qy):
        adapted = inner_loop(model, params, frozen, b, sx, sy, lrs, steps)
        loss, acc = functional_loss(model, adapted, frozen, b, qx, qy)
        return adapted, loss, acc

    with torch.no_grad():
        adapted, losses, accs = vmap(one)(bufs, episodes.support_x, episodes.support_y, episodes.query_x,
                                          episodes.query_y)
    return adapted, {"query_loss": losses, "query_accuracy": accs}


def reptile_direction(model: nn.Module, params: Params, frozen: Params, buffers: Params, episodes: Episode,
                      lrs: dict[str, float], steps: int) -> tuple[Params, dict]:
    """theta - mean(adapted theta): a descent direction, so an SGD step with rate e is Reptile's update."""
    return towards_adapted(params, *adapt_tasks(model, params, frozen, buffers, episodes, lrs, steps))


def towards_adapted(params: Params, adapted: Params, stats: dict) -> tuple[Params, dict]:
    """Reptile's direction theta - mean(adapted theta) from the tasks' adapted parameters, and mean stats."""
    direction = {k: params[k].detach() - adapted[k].mean(dim=0) for k in params}
    return direction, {k: v.mean().item() for k, v in stats.items()}


# --- the folded path (supernet.meta.folded): every task in one pass, the same numbers ----------
def stacked(params: Params, tasks: int) -> Params:
    """Each parameter repeated along a new leading task dimension (gradients flow back to the original)."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def folded_losses(network: TaskFoldedNetwork, params: Params, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (T,): cross-entropy and accuracy of the stacked tasks, task t run with params[...][t]."""
    logits = network(params, x)
    tasks, n = y.shape
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(tasks, n).mean(dim=1)
    return losses, (logits.argmax(dim=-1) == y).float().mean(dim=1)


def folded_inner_loop(network: TaskFoldedNetwork, params: Params, frozen: Params, x: torch.Tensor,
                      y: torch.Tensor, lrs: dict[str, float], steps: int, create_graph: bool) -> Params:
    """`inner_loop` for every stacked task at once: params and frozen hold (T, ...) tensors.

    The summed loss of the tasks has, per task, that task's gradient (the tasks share nothing), and
    `create_graph` keeps the second-order terms for an outer gradient. Gradients of parameters the
    folded forward leaves out (conv biases before a batch norm, which cancel) are zeros.
    """
    with torch.enable_grad():  # evaluation calls this under no_grad
        if not create_graph:
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
        for _ in range(steps):
            losses, _ = folded_losses(network, {**frozen, **params}, x, y)
            grads = torch.autograd.grad(losses.sum(), list(params.values()), create_graph=create_graph,
                                        materialize_grads=True)
            params = {k: p - lrs[k] * g for (k, p), g in zip(params.items(), grads)}
            if not create_graph:
                params = {k: v.detach().requires_grad_() for k, v in params.items()}
    return params


def folded_meta_gradient(network: TaskFoldedNetwork, params: Params, frozen: Params, episodes: Episode,
                         lrs: dict[str, float], steps: int, first_order: bool = False) -> tuple[Params, dict]:
    """`maml_meta_gradient` on the folded path."""
    tasks = episodes.num_tasks
    frozen = stacked(frozen, tasks)
    leaves = {k: v.detach().requires_grad_(not first_order) for k, v in params.items()}
    adapted = folded_inner_loop(network, stacked(leaves, tasks), frozen, episodes.support_x, episodes.support_y,
                                lrs, steps, create_graph=not first_order)
    losses, accs = folded_losses(network, {**frozen, **adapted}, episodes.query_x, episodes.query_y)
    if first_order:  # the query gradient at each task's adapted parameters, averaged
        grads = torch.autograd.grad(losses.sum(), list(adapted.values()), materialize_grads=True)
        meta_grads = {k: g.mean(dim=0) for k, g in zip(adapted, grads)}
    else:  # through the inner loop back to the shared starting point
        grads = torch.autograd.grad(losses.mean(), list(leaves.values()), materialize_grads=True)
        meta_grads = dict(zip(leaves, grads))
    return meta_grads, {"query_loss": losses.detach().mean().item(), "query_accuracy": accs.mean().item()}


def folded_adapt_tasks(network: TaskFoldedNetwork, params: Params, frozen: Params, episodes: Episode,
                       lrs: dict[str, float], steps: int) -> tuple[Params, dict]:
    """`adapt_tasks` on the folded path."""
    tasks = episodes.num_tasks
    frozen = stacked(frozen, tasks)
    adapted = folded_inner_loop(network, stacked(params, tasks), frozen, episodes.support_x, episodes.support_y,
                                lrs, steps, create_graph=False)
    adapted = {k: v.detach() for k, v in adapted.items()}
    with torch.no_grad():
        losses, accs = folded_losses(network, {**frozen, **adapted}, episodes.query_x, episodes.query_y)
    return adapted, {"query_loss": losses, "query_accuracy": accs}


# --- the meta-learner over a SearchNetwork ----------------------------------------------------
def learning_rate(name: str, value: Any) -> float:
    """An inner or meta learning rate: a finite number in [0, MAX_LEARNING_RATE]."""
    return checks.number(name, value, non_negative=True, maximum=MAX_LEARNING_RATE)


def _non_finite(tensors: Params) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if not torch.isfinite(t).all()]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class AdaptedNetwork:
    """A network adapted to one task: its parameters, its task-specific genotype, and its forward pass.

    Forward uses batch statistics (batch norm per task, as MAML does) on private buffer copies.
    """

    def __init__(self, network: SearchNetwork, params: Params) -> None:
        self.network = network
        self.params = params  # every parameter of the network (adapted ones and frozen ones)
        self._genotype = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of x (moved to the network's device)."""
        x = x.to(next(iter(self.params.values())).device) if isinstance(x, torch.Tensor) else x
        self.network.check_input(x)
        self.network.train()
        with torch.no_grad():
            return functional_call(self.network, (self.params, task_buffers(dict(self.network.named_buffers()))),
                                   (x,))

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Share of x classified as y (e.g. the task's query set)."""
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            raise ValueError(f"labels have shape {tuple(getattr(y, 'shape', ()))}; expected ({x.shape[0]},)")
        logits = self(x)
        return (logits.argmax(dim=-1) == y.to(logits.device)).float().mean().item()

    def module(self) -> SearchNetwork:
        """A stand-alone copy of the network holding the adapted parameters."""
        net = copy.deepcopy(self.network)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(self.params[name])
        return net

    @property
    def genotype(self) -> Any:
        """The genotype the adapted alphas derive by the space's rule."""
        if self._genotype is None:
            self._genotype = self.module().derive()
        return self._genotype


class MetaLearner:
    """Meta-learns a SearchNetwork's weights and (unless `learn_alphas=False`) its alphas across tasks.

    Inner loop: `inner_steps` SGD steps on a task's support set at `inner_lr_weights` for weights
    and `inner_lr_alphas` for alphas. Outer loop: Adam at `meta_lr_weights` / `meta_lr_alphas` for
    maml and fomaml; for reptile the meta learning rates are Reptile's interpolation rates (SGD).
    With `learn_alphas=False` the alphas stay fixed at their values (a fixed architecture).
    `folded`: None runs the folded path wherever it covers the network (`supernet.meta.folded`), False the
    reference path, True insists on the folded path (ValueError naming what it does not cover).
    """

    def __init__(self, network: SearchNetwork, method: str = "maml", inner_steps: int = 5,
                 inner_lr_weights: float = 0.1, inner_lr_alphas: float = 0.1, meta_lr_weights: float = 1e-3,
                 meta_lr_alphas: float = 1e-3, learn_alphas: bool = True,
                 device: "str | torch.device | None" = None, folded: bool | None = None) -> None:
        if not isinstance(network, SearchNetwork):
            raise ValueError(f"MetaLearner needs a SearchNetwork, got {type(network).__name__}")
        if not network.mixing.differentiable:
            usable = [name for name in MIXING.names() if MIXING.get(name).differentiable]
            raise ValueError(f"meta-learning adapts alphas by gradient, so it needs mixing in {usable}, "
                             f"not {network.mixing.name!r}")
        # torch.func transforms cannot see through the fused custom ops; the reference path computes the
        # same numbers (tests/test_kernels_network.py), so meta-learning runs on it.
        network.fused = False
        checks.choice("meta-learning method", method, METHODS)
        checks.integer("inner_steps", inner_steps)
        inner_lr_weights, inner_lr_alphas, meta_lr_weights, meta_lr_alphas = (
            learning_rate(name, value) for name, value in (
                ("inner_lr_weights", inner_lr_weights), ("inner_lr_alphas", inner_lr_alphas),
                ("meta_lr_weights", meta_lr_weights), ("meta_lr_alphas", meta_lr_alphas)))
        if device is not None:  # the run owns the device: the network moves, episodes follow it
            network = network.to(resolve_device(device))
        self.device = next(network.parameters()).device
        self.network = network.train()
        self.method, self.inner_steps, self.learn_alphas = method, inner_steps, learn_alphas
        self.inner_lr_weights, self.inner_lr_alphas = inner_lr_weights, inner_lr_alphas
        arch = {id(p) for p in network.arch_parameters()}
        self.arch_names = [n for n, p in network.named_parameters() if id(p) in arch]
        self.adapted_names = [n for n, p in network.named_parameters() if learn_alphas or id(p) not in arch]
        self.lrs = {n: self.inner_lr_alphas if n in self.arch_names else self.inner_lr_weights
                    for n in self.adapted_names}
        weights = network.weight_parameters()
        groups = [{"params": weights, "lr": meta_lr_weights}]
        if learn_alphas:
            groups.append({"params": network.arch_parameters(), "lr": meta_lr_alphas})
        else:
            for p in network.arch_parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.SGD(groups) if method == "reptile" else torch.optim.Adam(groups)
        problem = unsupported(network)
        if folded and problem is not None:
            raise ValueError(f"folded=True, but the folded path does not cover {problem}; "
                             "leave folded unset to run the reference path")
        # None: the folded path wherever it covers the network (the same numbers, faster)
        self.folded = TaskFoldedNetwork(network) if folded is not False and problem is None else None

    # --- parameters ----------------------------------------------------------------------------
    def split_params(self) -> tuple[Params, Params]:
        """(parameters the inner loop adapts, frozen parameters), detached from the module."""
        named = {n: p.detach() for n, p in self.network.named_parameters()}
        adapted = {n: named[n] for n in self.adapted_names}
        return adapted, {n: p for n, p in named.items() if n not in adapted}

    def buffers(self) -> Params:
        return dict(self.network.named_buffers())

    def _check_episode(self, episodes: Episode) -> Episode:
        if not isinstance(episodes, Episode):
            raise ValueError(f"expected an Episode, got {type(episodes).__name__}")
        episodes = Episode(*(getattr(episodes, f).to(self.device)
                             for f in ("support_x", "support_y", "query_x", "query_y", "classes")))
        x = episodes.support_x
        self.network.check_input(x if x.dim() == 4 else x[0])
        labels = torch.cat([episodes.support_y.flatten(), episodes.query_y.flatten()])
        if int(labels.max()) >= self.network.num_classes:
            raise ValueError(f"episode labels reach {int(labels.max())}, but the network has "
                             f"{self.network.num_classes} outputs; build it with num_classes = n_way")
        return episodes if episodes.support_y.dim() == 2 else stack_episodes([episodes])

    # --- meta-training -------------------------------------------------------------------------
    def meta_gradient(self, episodes: Episode) -> tuple[Params, dict]:
        """The method's meta-gradient (reptile: its update direction) over a stack of tasks, and stats."""
        episodes = self._check_episode(episodes)
        self.network.train()
        params, frozen = self.split_params()
        if self.method == "reptile":
            return towards_adapted(params, *self._adapt_tasks(params, frozen, episodes, self.inner_steps))
        if self.folded is not None:
            return folded_meta_gradient(self.folded, params, frozen, episodes, self.lrs, self.inner_steps,
                                        first_order=self.method == "fomaml")
        return maml_meta_gradient(self.network, params, frozen, self.buffers(), episodes, self.lrs, self.inner_steps,
                                  first_order=self.method == "fomaml")

    def meta_step(self, episodes: Episode) -> dict:
        """One outer update from a stack of tasks; returns the post-adaptation query loss and accuracy.

        NonFiniteUpdate (a ValueError) if the loss, a meta-gradient or an updated weight is NaN or
        infinite; the network is then left as it was before the step.
        """
        grads, stats = self.meta_gradient(episodes)
        bad = [] if math.isfinite(stats["query_loss"]) else ["the query loss"]
        bad += [f"the meta-gradient of {name}" for name in _non_finite(grads)]
        if bad:
            raise NonFiniteUpdate(f"{_listed(bad)} became non-finite")
        before = copy.deepcopy(self.state_dict())
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in self.network.named_parameters():
            if name in grads:
                p.grad = grads[name].detach().clone()
        self.optimizer.step()
        bad = _non_finite(dict(self.network.named_parameters()))
        if bad:  # finite gradients times a huge (finite) rate can still overflow
            self.load_state_dict(before)
            raise NonFiniteUpdate(f"the update made {_listed(bad)} non-finite")
        return stats

    # --- adaptation ----------------------------------------------------------------------------
    def adapt_many(self, episodes: Episode, steps: int | None = None) -> tuple[Params, dict]:
        """Adapted parameters of every stacked task (leading dimension) and per-task query loss and accuracy."""
        episodes = self._check_episode(episodes)
        self.network.train()
        params, frozen = self.split_params()
        adapted, stats = self._adapt_tasks(params, frozen, episodes, self.inner_steps if steps is None else steps)
        return {**{k: v.expand(episodes.num_tasks, *v.shape) for k, v in frozen.items()}, **adapted}, stats

    def _adapt_tasks(self, params: Params, frozen: Params, episodes: Episode, steps: int) -> tuple[Params, dict]:
        """Adapted parameters and per-task query stats, on the folded path where it covers the network."""
        if self.folded is not None:
            return folded_adapt_tasks(self.folded, params, frozen, episodes, self.lrs, steps)
        return adapt_tasks(self.network, params, frozen, self.buffers(), episodes, self.lrs, steps)

    def evaluate(self, episodes: Episode, steps: int | None = None, chunk: int = 100) -> torch.Tensor:
        """Query accuracy after adapting to each stacked task's support set, one value per task."""
        episodes = self._check_episode(episodes)
        accs = []
        for start in range(0, episodes.num_tasks, chunk):
            part = Episode(*(getattr(episodes, f)[start:start + chunk]
                             for f in ("support_x", "support_y", "query_x", "query_y", "classes")))
            accs.append(self.adapt_many(part, steps)[1]["query_accuracy"])
        return torch.cat(accs).cpu()

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> AdaptedNetwork:
        """The network adapted to one task's support set (weights and, if learned, alphas)."""
        if isinstance(support_x, torch.Tensor) and isinstance(support_y, torch.Tensor):
            support_x, support_y = support_x.to(self.device), support_y.to(self.device)
        self.network.check_input(support_x)
        if not isinstance(support_y, torch.Tensor) or support_y.shape != (support_x.shape[0],):
            raise ValueError(f"support labels have shape {tuple(getattr(support_y, 'shape', ()))}; "
                             f"expected ({support_x.shape[0]},)")
        episode = Episode(support_x, support_y, support_x, support_y, torch.unique(support_y))
        adapted, _ = self.adapt_many(episode, steps)
        return AdaptedNetwork(self.network, {k: v[0] for k, v in adapted.items()})

    def genotypes(self, adapted: Params) -> list[Any]:
        """The genotype each task's adapted alphas derive (`adapted` as `adapt_many` returns it)."""
        scratch = copy.deepcopy(self.network)
        tasks = next(iter(adapted.values())).shape[0]
        out = []
        with torch.no_grad():
            for t in range(tasks):
                for name in self.arch_names:
                    scratch.get_parameter(name).copy_(adapted[name][t])
                out.append(scratch.derive())
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
