"""The one-shot search loop (DARTS 1st/2nd order, GDAS, PC-DARTS, DrNAS, beta-DARTS, DARTS-, SDARTS-RS, SPOS/ENAS)
with checkpoints.

A `Searcher` owns one SearchNetwork, an SGD optimizer with a cosine schedule for the weights and
(for methods that learn them) an Adam optimizer for the architecture parameters, as the papers set
them. Its whole state (weights, alphas, optimizers, schedule, RNG states, position) goes into a
checkpoint, so a run interrupted anywhere resumes to bit-identical alphas on the CPU. Non-finite
losses, gradients or states stop the run before they are applied or saved.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import architect, data, devices, distributed, runs, selection
from .search_config import DRNAS_STAGES, SDARTS_EPSILON_START, SearchConfig, build_network
from .search_network import SearchNetwork, preserved_batchnorm, recalibrate_batchnorm
from .tensorboard import Events


def seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python's `random`."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class DivergenceError(RuntimeError):
    """A loss, gradient or state became NaN or infinite; the last good checkpoint is left as it was."""


@torch.no_grad()
def accuracy(model: nn.Module, pair: data.Pair, batch_size: int = 256, device: "torch.device | None" = None,
             autocast: Callable[[], Any] | None = None) -> float:
    """Top-1 accuracy in eval mode (restores the previous mode); batches go to `device` (default: the model's)."""
    was_training = model.training
    model.eval()
    x, y = pair
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else x.device
    autocast = autocast or contextlib.nullcontext
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast():
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def softmaxed_alphas(net: SearchNetwork) -> dict[str, list]:
    """Each cell type's mixing distribution as nested lists: softmax(alpha), or for DrNAS the Dirichlet mean."""
    with torch.no_grad():
        arch = {kind: {ct: t.float() for ct, t in tensors.items()} for kind, tensors in net.architecture().items()}
        return {ct: w.tolist() for ct, w in net.mixing.mixing_distribution(net.space, arch).items()}


# --- collapse diagnostics ---------------------------------------------------------------------------
def is_parameter_free(op: str) -> bool:
    """Pools and skip connections (`none` is never derived onto an edge)."""
    return op == "skip_connect" or "pool" in op


def parameter_free_share(space, genotype: Any) -> float:
    """Share of the derived cells' used edges (all cell types) whose op is parameter-free."""
    ops = [space.ops[k] for path in space.to_paths(genotype).values() for k in path
           if k is not None and space.ops[k] != "none"]
    return sum(map(is_parameter_free, ops)) / max(len(ops), 1)


def mean_alpha_entropy(net: SearchNetwork) -> float:
    """Mean over the edges of every cell type of the entropy (nats) of the rule's mixing distribution."""
    with torch.no_grad():
        arch = {kind: {ct: t.float() for ct, t in tensors.items()} for kind, tensors in net.architecture().items()}
        dists = net.mixing.mixing_distribution(net.space, arch)
        rows = torch.cat([-torch.special.xlogy(p, p).sum(dim=-1) for p in dists.values()])
    return float(rows.mean())


def hessian_eigenvalue(net: SearchNetwork, batch: data.Pair, iterations: int = 20, seed: int = 0) -> float:
    """The dominant (largest in magnitude) eigenvalue of the Hessian of the loss on `batch` w.r.t. the
    architecture parameters, by power iteration on Hessian-vector products (double backward).

    The forward runs in the network's current mode on the reference (unfused) path, with DrNAS's mean
    instead of a sample; batch-norm buffers, torch's RNG states and every parameter's `.grad` are left as
    they were, so a search that measures it continues exactly as one that does not.
    """
    arch = net.arch_parameters()
    device = arch[0].device
    state = architect.rng_state(device)
    fused, sample = net.fused, getattr(net.mixing, "sample", None)
    net.fused = False
    if hasattr(net.mixing, "sample"):
        net.mixing.sample = False
    try:
        with preserved_batchnorm(net), torch.enable_grad():
            loss = architect.loss_on(net, batch)
            grads = torch.autograd.grad(loss, arch, create_graph=True, allow_unused=True)
            # A cell type the network never runs (e.g. only reduction cells) has no gradient: it drops out.
            arch, grads = zip(*[(a, g) for a, g in zip(arch, grads, strict=True) if g is not None], strict=True)
            gen = torch.Generator().manual_seed(seed)
            v = [torch.randn(a.shape, generator=gen, dtype=a.dtype).to(device) for a in arch]
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            v = [t / norm for t in v]
            value = 0.0
            for _ in range(iterations):
                hv = torch.autograd.grad(grads, arch, grad_outputs=v, retain_graph=True)
                value = float(sum((h * t).sum() for h, t in zip(hv, v, strict=True)))
                norm = torch.sqrt(sum((h * h).sum() for h in hv))
                if float(norm) == 0.0:
                    return 0.0
                v = [h.detach() / norm for h in hv]
    finally:
        net.fused = fused
        if hasattr(net.mixing, "sample"):
            net.mixing.sample = sample
        architect.set_rng_state(state, device)
    return value


def _tensors(state: Any) -> Iterable[torch.Tensor]:
    """Every floating-point tensor inside a nested state (dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def count_non_finite(state: Any) -> int:
    """How many floating-point tensors inside `state` hold a NaN or an infinity."""
    return sum(1 for t in _tensors(state) if not bool(torch.isfinite(t).all()))


class WeightSGD(torch.optim.SGD):
    """torch's SGD, fused (one call over every tensor) where torch has the kernel for the weights: the per-tensor
    loop cost about 15 ms of a 470 ms step at the small DARTS config (889 tensors). The update is the same up to
    rounding.

    The fused kernel needs every tensor it steps to have a momentum buffer, or none to. A weight that gets its
    first gradient after the first step (an op that GDAS or SPOS had not sampled before) starts from a zero
    buffer, which with dampening 0 gives per-tensor SGD's first update (buffer = gradient)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float) -> None:
        params = list(params)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["fused"] and group["momentum"] and self.state:
                for p in group["params"]:
                    if p.grad is not None and "momentum_buffer" not in self.state.get(p, ()):
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return super().step(closure)


def weight_optimizer(params, config) -> WeightSGD:
    return WeightSGD(params, lr=config.w_lr, momentum=config.w_momentum, weight_decay=config.w_weight_decay)


class Searcher:
    """The bilevel search loop with checkpoints. `run()` trains to the end and returns the genotype.

    The searcher owns the device (`device`: auto|cpu|cuda|cuda:N), the precision (`config.precision`),
    an optional `torch.compile` of the network's forward (`compile=True`) and, when a torch.distributed
    process group is open, data parallelism: every rank takes its slice of each global batch, weight and
    alpha gradients are averaged over the ranks, and random draws agree because every rank seeds alike.
    """

    def __init__(self, config: SearchConfig, split: data.Split, checkpoint_path: Path | None = None,
                 quiet: bool = True, log: Callable[[str], None] | None = None,
                 callback: Callable[["Searcher"], None] | None = None, device: "str | torch.device" = "cpu",
                 compile: bool = False) -> None:
        self.config, self.split = config, split
        self.checkpoint_path = checkpoint_path
        self.quiet, self.log = quiet, log or (lambda msg: None)
        self.events = Events()  # TensorBoard (a no-op unless the run opens them)
        self.callback = callback
        self.device = devices.resolve_device(device)
        self.precision = devices.Precision(config.precision, self.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.quiet = quiet or self.rank != 0  # progress bars from rank 0 only
        self.parts = config.micro_batches if config.micro_batches > 1 else self.world  # BN groups per global batch
        if self.parts % self.world:
            raise ValueError(f"micro_batches={config.micro_batches} must be a multiple of the {self.world} ranks")
        if config.batch_size % self.parts:
            raise ValueError(f"batch_size={config.batch_size} (the global batch) must be a multiple of the "
                             f"{self.parts} {'ranks' if self.parts == self.world else 'micro-batches'}")
        # Batch sizes against the data first: a failed check costs no network.
        self.steps = min(data.steps_per_epoch(len(split.train[0]), config.batch_size),
                         data.steps_per_epoch(len(split.val[0]), config.batch_size),
                         config.steps_per_epoch or math.inf)
        seed_everything(config.seed)
        self.net = build_network(config, split.num_classes, split.in_channels).to(self.device)
        self.model: nn.Module = self.net  # what the training steps call (compiled with compile=True)
        self.compile_seconds: float | None = None
        if compile:
            self.model = torch.compile(self.net)
        self.ctx = architect.StepContext(model=self.model, autocast=self.precision.autocast,
                                         scale=self.precision.scale,
                                         reduce=self._reduce if self.world > 1 else architect._no_reduce)
        self.w_opt = weight_optimizer(self.net.weight_parameters(), config)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=config.epochs,
                                                                    eta_min=config.w_lr_min)
        self.learns_alphas = config.method_spec.learns_alphas
        self.a_opt = torch.optim.Adam(self.net.arch_parameters(), lr=config.a_lr, betas=(0.5, 0.999),
                                      weight_decay=config.alpha_weight_decay) if self.learns_alphas else None
        self.epoch = self.step = 0  # the next step to run
        self.search_done = False
        self.genotype: Any = None
        self.running = {"loss": 0.0, "correct": 0, "seen": 0}  # sums over the current epoch so far
        self.history: dict[str, list] = {"epochs": [], "alphas": [softmaxed_alphas(self.net)]}
        self.elapsed = 0.0  # search seconds spent before this process (resumed runs)
        self._started = time.perf_counter()
        self.last_checkpoint: Path | None = None

    # --- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resumed run needs, as `runs.save_checkpoint` stores it."""
        return {"config": self.config.to_dict(), "epoch": self.epoch, "step": self.step,
                "search_done": self.search_done,
                "genotype": None if self.genotype is None else self.net.space.format(self.genotype),
                "net": self.net.state_dict(), "w_opt": self.w_opt.state_dict(),
                "a_opt": self.a_opt.state_dict() if self.a_opt else None, "scheduler": self.scheduler.state_dict(),
                "rng": runs.capture_rng_state(), "running": dict(self.running), "history": self.history,
                "elapsed": self.seconds(), "world_size": self.world,
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None}

    def seconds(self) -> float:
        """Search time so far, across interruptions."""
        return self.elapsed + time.perf_counter() - self._started

    def load_state(self, state: dict) -> None:
        """Continues from a checkpoint's state (written on any device; tensors are moved to this run's)."""
        saved_world = state.get("world_size", 1)
        if saved_world != self.world:
            raise ValueError(f"the checkpoint was written by a run over {saved_world} rank(s); this run has "
                             f"{self.world}. Resume with the same world size (torchrun --nproc-per-node "
                             f"{saved_world}{'' if saved_world > 1 else ', or without torchrun'}): the batch "
                             "shards and batch-norm groups depend on it")
        self.net.load_state_dict(state["net"])
        self.w_opt.load_state_dict(state["w_opt"])
        if self.a_opt is not None:
            self.a_opt.load_state_dict(state["a_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        runs.restore_rng_state(state["rng"])
        self.epoch, self.step, self.search_done = state["epoch"], state["step"], state["search_done"]
        self.genotype = None if state["genotype"] is None else self.net.space.parse(state["genotype"])
        self.running, self.history, self.elapsed = dict(state["running"]), state["history"], state["elapsed"]
        self._started = time.perf_counter()
        self.last_checkpoint = self.checkpoint_path

    def save(self) -> None:
        """Writes a checkpoint (rank 0 only), after checking that every tensor of the state is finite."""
        if self.checkpoint_path is None or self.rank != 0:
            if self.checkpoint_path is not None:
                self.last_checkpoint = self.checkpoint_path
            return
        state = self.state()
        bad = count_non_finite(state)
        if bad:
            self._diverged(f"{bad} tensors of the network or optimizer state are not finite")
        runs.save_checkpoint(self.checkpoint_path, state)
        self.last_checkpoint = self.checkpoint_path

    # --- training ----------------------------------------------------------------------------------
    def _diverged(self, what: str) -> None:
        where = (f"the last good checkpoint {str(self.last_checkpoint)!r} is left intact"
                 if self.last_checkpoint else "no checkpoint was written yet")
        raise DivergenceError(f"{what} at epoch {self.epoch + 1}, step {self.step + 1} "
                              f"(global step {self.epoch * self.steps + self.step + 1}); {where}. "
                              "Try a smaller w_lr or a_lr.")

    def _check_loss(self, loss: torch.Tensor, what: str) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            self._diverged(f"{what} loss became {value}")
        return value

    def _check_gradient_norm(self, norm: torch.Tensor, what: str) -> None:
        if not math.isfinite(float(norm)) and self.precision.scaler is None:  # fp16: the scaler skips the step
            self._diverged(f"the gradient of the {what} became {float(norm)}")

    def _reduce(self, tensors: list[torch.Tensor]) -> None:
        """Averages gradients (and the losses riding with them) over the ranks, in place."""
        if self.world > 1:
            distributed.all_reduce_mean(tensors, f"the gradient all-reduce at epoch {self.epoch + 1}, "
                                                 f"step {self.step + 1}")

    def local_batches(self, batch: data.Pair) -> list[data.Pair]:
        """This rank's micro-batches of a global batch, on the run's device."""
        per_rank = self.parts // self.world
        return [devices.to_device(distributed.shard(batch, self.parts, self.rank * per_rank + j), self.device)
                for j in range(per_rank)]

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.precision.scaler is None:
            optimizer.step()
        else:
            self.precision.scaler.step(optimizer)

    def _arch_step(self, train: list[data.Pair], val: list[data.Pair]) -> None:
        arch = self.net.arch_parameters()
        if self.config.method_spec.arch_order == 2:
            xi = self.config.unrolled_xi if self.config.unrolled_xi is not None else self.w_opt.param_groups[0]["lr"]
            grads, loss = architect.unrolled_gradient(self.net, train, val, xi, ctx=self.ctx)
        else:
            grads, loss = architect.first_order_gradient(self.net, val, ctx=self.ctx)
        self._check_loss(loss, "validation (architecture)")
        regulariser = self.config.regulariser
        if regulariser is not None:
            weight = self.regulariser_weight(self.schedule_epoch)
            reg_grads, term = architect.regulariser_gradient(self.net, regulariser, weight, ctx=self.ctx)
            self._check_loss(term, f"{regulariser} regulariser")
            grads = [g + r for g, r in zip(grads, reg_grads, strict=True)]
        for p, g in zip(arch, grads, strict=True):
            p.grad = g
        if self.precision.scaler is not None:
            self.precision.scaler.unscale_(self.a_opt)
        self._check_gradient_norm(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))),
                                  "architecture parameters")
        self._optimizer_step(self.a_opt)
        if count_non_finite(arch):
            self._diverged("the architecture parameters became non-finite")

    def _weight_step(self, train: list[data.Pair]) -> tuple[float, int]:
        params = self.net.weight_parameters()
        self.w_opt.zero_grad(set_to_none=True)
        start = architect.rng_state(self.device) if len(train) > 1 else None
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        # SDARTS-RS: only this step's forwards mix with perturbed weights
        smoothing = (self.net.mixing.perturbing() if self.config.method_spec.smooths_weight_step
                     else contextlib.nullcontext())
        with smoothing:
            for i, (x, y) in enumerate(train):
                if i:  # every micro-batch sees the draws of one forward, as every rank does
                    architect.set_rng_state(start, self.device)
                with self.precision.autocast():
                    logits = self.model(x)
                    loss = F.cross_entropy(logits, y)
                self.precision.scale(loss / len(train) if len(train) > 1 else loss).backward()
                loss_sum += loss.detach().float() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
        if self.world > 1:
            grads = [p.grad for p in params if p.grad is not None]
            self._reduce(grads)
            loss_sum, correct = distributed.all_reduce_sum([float(loss_sum), float(correct)], self.device,
                                                           f"the loss all-reduce at epoch {self.epoch + 1}")
        seen = sum(len(y) for _, y in train) * self.world
        value = self._check_loss(torch.as_tensor(float(loss_sum) / seen), "training")
        if self.precision.scaler is not None:
            self.precision.scaler.unscale_(self.w_opt)
        norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True)
        self._check_gradient_norm(norm, "weights")
        self._optimizer_step(self.w_opt)
        return value, int(correct)

    def train_step(self, train: data.Pair, val: data.Pair) -> None:
        """One search step on a global batch: an architecture step (once warm-up is over) and a weight step."""
        if self.model is not self.net and self.compile_seconds is None:
            began = time.perf_counter()
        warm = self.tuning or self.stage(self.epoch)[1] >= self.config.arch_warmup_epochs
        update_alphas = self.learns_alphas and warm
        n = len(train[1])
        train, val = self.local_batches(train), self.local_batches(val)
        if update_alphas and self.config.method_spec.arch_first:
            self._arch_step(train, val)
        loss, correct = self._weight_step(train)
        if update_alphas and not self.config.method_spec.arch_first:
            self._arch_step(train, val)
        if self.precision.scaler is not None:
            self.precision.scaler.update()
        if self.model is not self.net and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - began  # the first compiled step: compilation and one step
            self.log(f"compile: the first compiled search step took {self.compile_seconds:.1f} s")
        self.running["loss"] += loss * n
        self.running["correct"] += correct
        self.running["seen"] += n

    @property
    def tuning(self) -> bool:
        """Whether the run is past the search, in perturbation-based selection's tuning epochs."""
        return self.epoch >= self.config.epochs

    @property
    def schedule_epoch(self) -> int:
        """The epoch the schedules (tau, auxiliary skip, noise bound, regulariser weight) follow: the current one,
        or while selection tunes the supernet the end of the search, where they arrive after its last epoch
        (DARTS-'s auxiliary skip at 0, SDARTS-RS's noise bound and beta-DARTS's weight at their full values)."""
        return min(self.epoch, self.config.epochs)

    def _project_due(self) -> None:
        """Perturbation-based selection, at the start of a tuning epoch: makes the projections due by now in
        every cell type (none made yet: the weights' optimizer first restarts at a tenth of w_lr, constant,
        without momentum, as DARTS-PT's reset_optimizer). Projections a resumed run's checkpoint holds are not
        redone."""
        c, space = self.config, self.net.space
        projections = self.history.setdefault("projections", [])
        done = len(projections) // len(space.cell_types)
        due = selection.projections_due(self.epoch - c.epochs, selection.projection_events(space),
                                        c.projection_interval)
        if done == 0 and due:
            self.w_opt.state.clear()
            for group in self.w_opt.param_groups:
                group["lr"] = c.w_lr * selection.TUNING_LR_FACTOR
        scoring = (self.split.val, c.batch_size, self.device, self.precision.autocast)
        for count in range(done, due):
            rng = selection.projection_rng(c.seed, count)
            for ct in space.cell_types:
                record: dict[str, Any] = {"epoch": self.epoch + 1, "cell_type": ct}
                if count < space.num_edges:  # an edge's op
                    edge = rng.choice(selection.open_edges(self.net, ct))
                    op, scores = selection.select_operation(self.net, ct, edge, *scoring,
                                                            criterion=c.projection_criterion)
                    self.net.project_edge(ct, edge, op)
                    record.update(edge=edge, op=space.ops[op], scores=scores)
                    measure = c.projection_criterion  # what the choice compared: 'accuracy' or 'loss'
                    self.log(f"selection: edge {edge} of the {ct} cell -> {space.ops[op]} (validation {measure} "
                             "without each candidate: " + ", ".join(f"{s['op']} {s[measure]:.4f}" for s in scores)
                             + ")")
                else:  # a node's inputs
                    settled = {p["node"] for p in projections if p["cell_type"] == ct and "node" in p}
                    node = rng.choice([n for n in space.intermediate_nodes if n not in settled])
                    dropped, rounds = selection.select_inputs(self.net, ct, node, *scoring,
                                                              criterion=c.projection_criterion)
                    for e in dropped:
                        self.net.drop_edge(ct, e)
                    record.update(node=node, dropped=dropped, scores=rounds)
                    self.log(f"selection: node {node} of the {ct} cell drops the inputs of edges {dropped}")
                projections.append(record)

    def stage(self, epoch: int) -> tuple[int, int]:
        """(stage, epoch within it): DrNAS's progressive search has two stages, every other search one; the
        alpha warm-up (arch_warmup_epochs) starts each stage, as in DrNAS's code."""
        for stage, length in enumerate(self.config.stage_epochs):
            if epoch < length:
                return stage, epoch
            epoch -= length
        raise ValueError(f"epoch {epoch} is past the search's {self.config.epochs} epochs")

    def _enter_stage(self, stage: int) -> None:
        """DrNAS's progressive step: each edge keeps its strongest candidates, then the partial channels widen.
        The weights' optimizer keeps its momentum (widened alike) and cosine schedule, the alphas' Adam its
        state, as in DrNAS's code."""
        k, keep = DRNAS_STAGES[stage]
        self.net.prune_candidates(keep)
        self.net.widen_partial_channels(k, self.w_opt)
        self.log(f"drnas stage {stage + 1}: {keep} candidates per edge, partial channels 1/{k}")

    def regulariser_weight(self, epoch: int) -> float:
        """The weight of the method's regulariser: DrNAS reg_scale; beta-DARTS beta_lambda * epoch / epochs
        (linear from 0 toward beta_lambda, as beta-DARTS's code: 50 * epoch / 100 over its 100 epochs)."""
        c = self.config
        if c.regulariser == "beta-decay":
            return c.beta_lambda * epoch / c.epochs
        return c.reg_scale

    def aux_skip(self, epoch: int) -> float:
        """DARTS-: the auxiliary skip weight (epochs - epoch) / epochs, linear from 1 at the first epoch to
        1 / epochs at the last, as DARTS-'s linear decay (it reaches 0 only after the search)."""
        return 1.0 - epoch / self.config.epochs

    def smoothing_epsilon(self, epoch: int) -> float:
        """SDARTS-RS: the weight step's noise bound 0.03 + (sdarts_epsilon - 0.03) * epoch / epochs, linear from
        0.03 at the first epoch toward sdarts_epsilon, as SDARTS's code (it reaches it only after the search)."""
        c = self.config
        return SDARTS_EPSILON_START + (c.sdarts_epsilon - SDARTS_EPSILON_START) * epoch / c.epochs

    def diagnostics(self, genotype: Any) -> dict:
        """Collapse diagnostics for the epoch record: parameter-free share of the derived cells, mean alpha
        entropy per edge and, every `hessian_every` epochs, the dominant alpha-Hessian eigenvalue."""
        c = self.config
        out: dict[str, Any] = {"parameter_free_share": parameter_free_share(self.net.space, genotype)}
        if self.learns_alphas:
            out["alpha_entropy"] = mean_alpha_entropy(self.net)
            if c.hessian_every and (self.epoch + 1) % c.hessian_every == 0:
                x, y = self.split.val
                batch = devices.to_device((x[:c.batch_size], y[:c.batch_size]), self.device)
                out["hessian_eigenvalue"] = hessian_eigenvalue(self.net, batch, seed=c.seed)  # in fp32
        if c.regulariser is not None:
            out["regulariser_weight"] = self.regulariser_weight(self.schedule_epoch)
        if c.method_spec.decays_aux_skip:
            out["aux_skip"] = self.net.mixing.beta
        if c.method_spec.smooths_weight_step:
            out["sdarts_epsilon"] = self.net.mixing.epsilon
        if c.drnas_progressive:
            out["channel_divisor"] = self.net.mixing.channel_divisor
        if c.selection == "perturbation":
            out["projected_edges"] = sum(len(chosen) for chosen in self.net.projected_edges().values())
            out["dropped_edges"] = sum(len(dropped) for dropped in self.net.dropped_edges().values())
        return out

    def tau(self, epoch: int) -> float:
        """GDAS: linear from tau_max at the first epoch to tau_min at the last."""
        c = self.config
        return c.tau_max - (c.tau_max - c.tau_min) * epoch / max(c.epochs - 1, 1)

    def _end_epoch(self) -> None:
        if not self.tuning:  # selection tunes at a constant rate
            self.scheduler.step()
        seen = max(self.running["seen"], 1)
        if self.world > 1:  # batch-norm running statistics: the ranks' average, so every rank holds the same
            distributed.all_reduce_mean([b for b in self.net.buffers() if b.is_floating_point()],
                                        f"the batch-norm statistics all-reduce at epoch {self.epoch + 1}")
        record = {"epoch": self.epoch + 1, "train_loss": self.running["loss"] / seen,
                  "train_accuracy": self.running["correct"] / seen,
                  "val_accuracy": accuracy(self.net, self.split.val, device=self.device,
                                           autocast=self.precision.autocast),
                  "w_lr": self.w_opt.param_groups[0]["lr"]}
        genotype = self.net.derive()
        record["genotype"] = self.net.space.format(genotype)
        if self.config.method_spec.anneals_temperature:
            record["tau"] = self.net.mixing.tau
        record.update(self.diagnostics(genotype))
        self.history["epochs"].append(record)
        self.history["alphas"].append(softmaxed_alphas(self.net))
        self.events.scalars(record["epoch"], {k: v for k, v in record.items() if k not in ("epoch", "genotype")},
                            prefix="search/")
        if self.learns_alphas:
            self.events.alphas(record["epoch"], self.history["alphas"][-1], self.net.space.ops, self.net.space.edges)
        self.events.text("search/genotype", record["genotype"], record["epoch"])
        self.log(f"epoch {record['epoch']}/{self.config.total_epochs}: train loss {record['train_loss']:.4f}, "
                 f"train acc {record['train_accuracy']:.4f}, val acc {record['val_accuracy']:.4f}, "
                 f"parameter-free share {record['parameter_free_share']:.3f}"
                 + (f", alpha entropy {record['alpha_entropy']:.4f}" if "alpha_entropy" in record else "")
                 + (f", alpha-Hessian eigenvalue {record['hessian_eigenvalue']:.4g}"
                    if "hessian_eigenvalue" in record else ""))
        self.epoch, self.step = self.epoch + 1, 0
        self.running = {"loss": 0.0, "correct": 0, "seen": 0}

    def run(self) -> Any:
        """Trains from the current position to the end of the search; returns the derived genotype."""
        from tqdm.auto import tqdm

        c = self.config
        self.net.train()
        epochs = tqdm(total=c.total_epochs, desc=f"search ({c.method})", unit="epoch", disable=self.quiet,
                      initial=self.epoch, dynamic_ncols=True)
        for epoch in range(self.epoch, c.total_epochs if not self.search_done else 0):
            if self.tuning:
                self._project_due()
            else:
                stage, within = self.stage(epoch)
                if stage and within == 0 and self.net.mixing.channel_divisor != DRNAS_STAGES[stage][0]:
                    self._enter_stage(stage)  # not yet done: a run resumed inside the stage loaded it done
            if c.method_spec.anneals_temperature:
                self.net.mixing.tau = self.tau(self.schedule_epoch)
            if c.method_spec.decays_aux_skip:
                self.net.mixing.beta = self.aux_skip(self.schedule_epoch)
            if c.method_spec.smooths_weight_step:
                self.net.mixing.epsilon = self.smoothing_epsilon(self.schedule_epoch)
            augment = self.split.black if c.augment else None  # both halves, as DARTS's search does
            train = data.epoch_batches(self.split.train, c.batch_size, c.seed, epoch, start=self.step, augment=augment)
            val = data.epoch_batches(self.split.val, c.batch_size, c.seed + 1, epoch, start=self.step, augment=augment)
            bar = tqdm(total=self.steps, initial=self.step, desc=f"epoch {epoch + 1}", unit="step", leave=False,
                       disable=self.quiet, dynamic_ncols=True)
            for train_batch, val_batch in zip(train, val):  # noqa: B905 (val may hold more batches than used)
                if self.step >= self.steps:
                    break
                self.train_step(train_batch, val_batch)
                self.step += 1
                seen = max(self.running["seen"], 1)
                bar.set_postfix(loss=f"{self.running['loss'] / seen:.3f}",
                                acc=f"{self.running['correct'] / seen:.3f}", refresh=False)
                bar.update()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < self.steps:
                    self.save()
                if self.callback is not None:
                    self.callback(self)
            bar.close()
            self._end_epoch()
            last = self.history["epochs"][-1]
            epochs.set_postfix(loss=f"{last['train_loss']:.3f}", val_acc=f"{last['val_accuracy']:.3f}", refresh=False)
            epochs.update()
            self.save()
        epochs.close()
        if not self.search_done:
            self.genotype = self.derive()
            self.search_done = True
            self.save()
        return self.genotype

    def derive(self) -> Any:
        """The searched genotype: the space's rule on the alphas (on the projected edges with perturbation-based
        selection), or for SPOS the best sampled subnet."""
        if self.config.method_spec.arch_order > 0:
            return self.net.derive()
        return self.best_sampled_subnet()

    def best_sampled_subnet(self) -> Any:
        """SPOS's second stage in its simplest form: random subnets ranked on the validation split."""
        c = self.config
        rng = random.Random(c.seed)
        batches = list(data.epoch_batches(self.split.train, c.batch_size, c.seed, epoch=c.epochs))[:4]
        best, best_acc = None, -1.0
        for _ in range(c.spos_candidates):
            genotype = self.net.space.random_genotype(rng)
            with preserved_batchnorm(self.net):
                sub = recalibrate_batchnorm(self.net.subnet(genotype), [devices.to_device(b, self.device)
                                                                        for b in batches])
                acc = accuracy(sub, self.split.val, device=self.device, autocast=self.precision.autocast)
            if acc > best_acc:
                best, best_acc = genotype, acc
        self.log(f"spos: best of {c.spos_candidates} sampled subnets has val acc {best_acc:.4f}")
        self.net.train()
        return best
