"""One-shot search loops (DARTS 1st/2nd order, GDAS, PC-DARTS, single-path SPOS/ENAS) and retraining.

A `Searcher` owns one SearchNetwork, an SGD optimizer with a cosine schedule for the weights and
(for methods that learn them) an Adam optimizer for the architecture parameters, as the papers set
them. Its whole state (weights, alphas, optimizers, schedule, RNG states, position) goes into a
checkpoint, so a run interrupted anywhere resumes to bit-identical alphas on the CPU.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import architect, data, runs
from .eval_network import EvalNetwork, count_parameters
from .search_network import SearchNetwork, preserved_batchnorm, recalibrate_batchnorm
from .spaces import get_space, list_spaces


@dataclass(frozen=True)
class Method:
    """How one published search method trains: its mixing rule, alpha update and paper settings."""

    mixing: str
    arch_order: int  # 0: weights only, 1: first-order alphas, 2: unrolled (second-order) alphas
    arch_first: bool  # DARTS updates alphas before weights in a step; GDAS after
    a_lr: float  # Adam learning rate for the architecture parameters
    w_weight_decay: float
    warmup_fraction: float  # share of epochs before alphas start to move (PC-DARTS: 15 of 50)
    summary: str


METHODS = {
    "darts": Method("softmax", 1, True, 3e-4, 3e-4, 0.0, "DARTS, first order (softmax over all candidates)"),
    "darts-2nd": Method("softmax", 2, True, 3e-4, 3e-4, 0.0,
                        "DARTS, second order (unrolled step, finite-difference Hessian-vector product)"),
    "gdas": Method("gumbel", 1, False, 3e-4, 5e-4, 0.0, "GDAS (one hard Gumbel-softmax path per edge, tau 10 -> 0.1)"),
    "pc-darts": Method("partial", 1, True, 6e-4, 3e-4, 0.3,
                       "PC-DARTS (1/k of the channels, edge normalisation, alpha warm-up)"),
    "spos": Method("sample", 0, True, 0.0, 3e-4, 0.0,
                   "single path, uniform sampling (SPOS / ENAS style); the best of spos_candidates is derived"),
}


@dataclass
class SearchConfig:
    """Everything that decides a search's result. Defaults are the main job: a few minutes on 2 CPU cores."""

    method: str = "darts"
    space: str = "darts"
    dataset: str = "digits"  # 'digits' (embedded), 'cifar10' (needs data_dir), 'tensors' (passed in)
    data_dir: str | None = None
    data_fingerprint: str | None = None  # set for dataset='tensors', so a resume checks it gets the same data
    max_train: int | None = None  # cap on the non-test examples (for a quick look at a large dataset)
    val_fraction: float = 0.5  # of the non-test data: the split the alphas are fitted on (DARTS: half)
    test_fraction: float = 0.2  # held out for the final accuracies (unused when the dataset has a test set)
    seed: int = 0
    C: int = 8  # initial channels of the search network (DARTS: 16)
    layers: int = 5  # cells, reductions at 1/3 and 2/3 (DARTS: 8)
    epochs: int = 6  # (DARTS: 50)
    batch_size: int = 64
    steps_per_epoch: int | None = None  # cap on steps per epoch (None: one pass over the training split)
    w_lr: float = 0.025  # SGD with momentum, cosine schedule down to w_lr_min (DARTS)
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float | None = None  # None: the method's paper value
    grad_clip: float = 5.0
    a_lr: float | None = None  # Adam for the alphas, betas (0.5, 0.999); None: the method's paper value
    a_weight_decay: float = 1e-3
    arch_warmup_epochs: int | None = None  # epochs of weight-only training first; None: the method's share
    unrolled_xi: float | None = None  # darts-2nd virtual step size; None: the current weight learning rate
    partial_k: int = 4  # pc-darts channel divisor
    tau_max: float = 10.0  # gdas temperature, annealed linearly to tau_min over the epochs
    tau_min: float = 0.1
    spos_candidates: int = 20  # spos: random subnets ranked on the validation split to pick the result
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: at the end of each epoch only)
    retrain_epochs: int = 6  # retraining of the derived and a random architecture (0: skip)
    retrain_C: int = 8
    retrain_layers: int = 5
    retrain_lr: float = 0.05
    retrain_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.space not in list_spaces():
            raise ValueError(f"unknown space {self.space!r}; expected one of {list_spaces()}")
        m = METHODS[self.method]
        if self.w_weight_decay is None:
            self.w_weight_decay = m.w_weight_decay
        if self.a_lr is None:
            self.a_lr = m.a_lr
        if self.arch_warmup_epochs is None:
            self.arch_warmup_epochs = int(m.warmup_fraction * self.epochs)
        positive = ("C", "layers", "epochs", "batch_size", "retrain_C", "retrain_layers", "retrain_batch_size",
                    "partial_k", "spos_candidates")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("retrain_epochs", "checkpoint_every", "arch_warmup_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer or None, got {self.steps_per_epoch!r}")
        for name in ("w_lr", "w_lr_min", "grad_clip", "tau_max", "tau_min"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.method == "gdas" and self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min} must not exceed tau_max={self.tau_max}")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown search options {unknown}; expected some of {sorted(known)}")
        return cls(**d)


def build_network(config: SearchConfig, num_classes: int, in_channels: int) -> SearchNetwork:
    """The search network a config describes (weights drawn from torch's global RNG)."""
    return SearchNetwork(config.space, C=config.C, layers=config.layers, num_classes=num_classes,
                         in_channels=in_channels, mixing=config.method_spec.mixing, partial_k=config.partial_k,
                         tau=config.tau_max)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


@torch.no_grad()
def accuracy(model: nn.Module, pair: data.Pair, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    x, y = pair
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def softmaxed_alphas(net: SearchNetwork) -> dict[str, list]:
    with torch.no_grad():
        return {ct: F.softmax(net.alphas(ct), dim=-1).tolist() for ct in net.space.cell_types}


class Searcher:
    """The bilevel search loop with checkpoints. `run()` trains to the end and returns the genotype."""

    def __init__(self, config: SearchConfig, split: data.Split, checkpoint_path: Path | None = None,
                 quiet: bool = True, log: Callable[[str], None] | None = None,
                 callback: Callable[["Searcher"], None] | None = None) -> None:
        self.config, self.split = config, split
        self.checkpoint_path = checkpoint_path
        self.quiet, self.log = quiet, log or (lambda msg: None)
        self.callback = callback
        seed_everything(config.seed)
        self.net = build_network(config, split.num_classes, split.in_channels)
        self.w_opt = torch.optim.SGD(self.net.weight_parameters(), lr=config.w_lr, momentum=config.w_momentum,
                                     weight_decay=config.w_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=config.epochs,
                                                                    eta_min=config.w_lr_min)
        self.learns_alphas = self.net.mixing.learns_alphas and config.method_spec.arch_order > 0
        self.a_opt = torch.optim.Adam(self.net.arch_parameters(), lr=config.a_lr, betas=(0.5, 0.999),
                                      weight_decay=config.a_weight_decay) if self.learns_alphas else None
        self.steps = min(data.steps_per_epoch(len(split.train[0]), config.batch_size),
                         data.steps_per_epoch(len(split.val[0]), config.batch_size),
                         config.steps_per_epoch or math.inf)
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
        return {"config": self.config.to_dict(), "epoch": self.epoch, "step": self.step,
                "search_done": self.search_done,
                "genotype": None if self.genotype is None else self.net.space.format(self.genotype),
                "net": self.net.state_dict(), "w_opt": self.w_opt.state_dict(),
                "a_opt": self.a_opt.state_dict() if self.a_opt else None, "scheduler": self.scheduler.state_dict(),
                "rng": runs.capture_rng_state(), "running": dict(self.running), "history": self.history,
                "elapsed": self.seconds()}

    def seconds(self) -> float:
        """Search time so far, across interruptions."""
        return self.elapsed + time.perf_counter() - self._started

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.w_opt.load_state_dict(state["w_opt"])
        if self.a_opt is not None:
            self.a_opt.load_state_dict(state["a_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        runs.restore_rng_state(state["rng"])
        self.epoch, self.step, self.search_done = state["epoch"], state["step"], state["search_done"]
        self.genotype = None if state["genotype"] is None else self.net.space.parse(state["genotype"])
        self.running, self.history, self.elapsed = dict(state["running"]), state["history"], state["elapsed"]
        self._started = time.perf_counter()
        self.last_checkpoint = self.checkpoint_path

    def save(self) -> None:
        if self.checkpoint_path is not None:
            runs.save_checkpoint(self.checkpoint_path, self.state())
            self.last_checkpoint = self.checkpoint_path

    # --- training ----------------------------------------------------------------------------------
    def _check(self, loss: torch.Tensor, what: str) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            where = (f"the last good checkpoint {str(self.last_checkpoint)!r} is left intact"
                     if self.last_checkpoint else "no checkpoint was written yet")
            raise DivergenceError(f"{what} loss became {value} at epoch {self.epoch + 1}, step {self.step + 1} "
                                  f"(global step {self.epoch * self.steps + self.step + 1}); {where}. "
                                  "Try a smaller w_lr or a_lr.")
        return value

    def _arch_step(self, train: data.Pair, val: data.Pair) -> None:
        arch = self.net.arch_parameters()
        if self.config.method_spec.arch_order == 2:
            xi = self.config.unrolled_xi if self.config.unrolled_xi is not None else self.w_opt.param_groups[0]["lr"]
            grads, loss = architect.unrolled_gradient(self.net, train, val, xi)
        else:
            grads, loss = architect.first_order_gradient(self.net, val)
        self._check(loss, "validation (architecture)")
        architect.apply_gradient(self.a_opt, arch, grads)

    def _weight_step(self, train: data.Pair) -> tuple[float, int]:
        x, y = train
        self.w_opt.zero_grad(set_to_none=True)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        value = self._check(loss, "training")
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.weight_parameters(), self.config.grad_clip, foreach=True)
        self.w_opt.step()
        return value, int((logits.detach().argmax(1) == y).sum())

    def train_step(self, train: data.Pair, val: data.Pair) -> None:
        update_alphas = self.learns_alphas and self.epoch >= self.config.arch_warmup_epochs
        if update_alphas and self.config.method_spec.arch_first:
            self._arch_step(train, val)
        loss, correct = self._weight_step(train)
        if update_alphas and not self.config.method_spec.arch_first:
            self._arch_step(train, val)
        self.running["loss"] += loss * len(train[1])
        self.running["correct"] += correct
        self.running["seen"] += len(train[1])

    def tau(self, epoch: int) -> float:
        """GDAS: linear from tau_max at the first epoch to tau_min at the last."""
        c = self.config
        return c.tau_max - (c.tau_max - c.tau_min) * epoch / max(c.epochs - 1, 1)

    def _end_epoch(self) -> None:
        self.scheduler.step()
        seen = max(self.running["seen"], 1)
        record = {"epoch": self.epoch + 1, "train_loss": self.running["loss"] / seen,
                  "train_accuracy": self.running["correct"] / seen,
                  "val_accuracy": accuracy(self.net, self.split.val),
                  "w_lr": self.w_opt.param_groups[0]["lr"], "genotype": self.net.space.format(self.net.derive())}
        if self.config.method == "gdas":
            record["tau"] = self.net.mixing.tau
        self.history["epochs"].append(record)
        self.history["alphas"].append(softmaxed_alphas(self.net))
        self.log(f"epoch {record['epoch']}/{self.config.epochs}: train loss {record['train_loss']:.4f}, "
                 f"train acc {record['train_accuracy']:.4f}, val acc {record['val_accuracy']:.4f}")
        self.epoch, self.step = self.epoch + 1, 0
        self.running = {"loss": 0.0, "correct": 0, "seen": 0}

    def run(self) -> Any:
        """Trains from the current position to the end of the search; returns the derived genotype."""
        from tqdm.auto import tqdm

        c = self.config
        self.net.train()
        epochs = tqdm(total=c.epochs, desc=f"search ({c.method})", unit="epoch", disable=self.quiet,
                      initial=self.epoch, dynamic_ncols=True)
        for epoch in range(self.epoch, c.epochs if not self.search_done else 0):
            if c.method == "gdas":
                self.net.mixing.tau = self.tau(epoch)
            train = data.epoch_batches(self.split.train, c.batch_size, c.seed, epoch, start=self.step)
            val = data.epoch_batches(self.split.val, c.batch_size, c.seed + 1, epoch, start=self.step)
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
        """The searched genotype: the space's rule on the alphas, or for SPOS the best sampled subnet."""
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
                sub = recalibrate_batchnorm(self.net.subnet(genotype), batches)
                acc = accuracy(sub, self.split.val)
            if acc > best_acc:
                best, best_acc = genotype, acc
        self.log(f"spos: best of {c.spos_candidates} sampled subnets has val acc {best_acc:.4f}")
        self.net.train()
        return best


def train_from_scratch(genotype: Any, config: SearchConfig, split: data.Split, seed: int, quiet: bool = True,
                       desc: str = "retrain") -> dict:
    """Trains the stand-alone network of `genotype` on train+val for `retrain_epochs`; returns its test accuracy."""
    from tqdm.auto import tqdm

    c = config
    seed_everything(seed)
    model = EvalNetwork(c.space, genotype, C=c.retrain_C, layers=c.retrain_layers, num_classes=split.num_classes,
                        in_channels=split.in_channels)
    train = split.train_val
    steps = data.steps_per_epoch(len(train[0]), c.retrain_batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=c.retrain_lr, momentum=0.9, weight_decay=3e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.retrain_epochs * steps)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=c.retrain_epochs * steps, desc=desc, unit="step", disable=quiet, leave=False, dynamic_ncols=True)
    loss_value = float("nan")
    for epoch in range(c.retrain_epochs):
        for x, y in data.epoch_batches(train, c.retrain_batch_size, seed, epoch):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise DivergenceError(f"retraining {desc}: loss became {loss_value} in epoch {epoch + 1}; "
                                      "try a smaller retrain_lr")
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
            opt.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            bar.update()
    bar.close()
    return {"genotype": model.space.format(model.genotype),
            "test_accuracy": accuracy(model, split.test), "final_train_loss": loss_value,
            "parameters": count_parameters(model), "seconds": time.perf_counter() - start}


@dataclass
class SearchResult:
    """What `supernet.search` returns: the genotype, the per-epoch history and the run folder's files."""

    genotype: Any
    history: dict
    run_dir: Path
    paths: dict[str, Path]
    results: dict = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        """Test accuracy of the derived architecture retrained from scratch (None if not retrained)."""
        return (self.results.get("derived") or {}).get("test_accuracy")

    @property
    def random_accuracy(self) -> float | None:
        """Test accuracy of a random architecture retrained with the same budget."""
        return (self.results.get("random") or {}).get("test_accuracy")


def _resolve_config(options: dict, resume: Path | None, data_tensors: data.Pair | None) -> SearchConfig:
    if data_tensors is not None:
        options = {**options, "dataset": options.get("dataset", "tensors"),
                   "data_fingerprint": data.fingerprint(*data_tensors)}
    if resume is None:
        return SearchConfig.from_dict(options)
    return SearchConfig.from_dict(runs.resume_config(resume, options))


def search(*, resume: "str | Path | None" = None, data: data.Pair | None = None, out: "str | Path" = "runs",
           run_dir: "str | Path | None" = None, quiet: bool = True,
           callback: Callable[[Searcher], None] | None = None, **options: Any) -> SearchResult:
    """Runs a one-shot search (then retrains the result and a random architecture) and writes a run folder.

    `options` are `SearchConfig` fields (method, epochs, C, ...). `data=(images, labels)` searches on
    your tensors. `resume=RUN_DIR` continues an interrupted run; options given then must match it.
    `callback(searcher)` is called after every step (for monitoring or tests).
    """
    from . import data as data_module
    from . import plots

    if resume is not None:
        resume = Path(resume)
        if not resume.is_dir():
            raise ValueError(f"cannot resume: {str(resume)!r} is not a run folder")
        run_dir = resume
    config = _resolve_config(options, resume, data)
    split = data_module.load_split(config.dataset, config.seed, config.data_dir, data, config.val_fraction,
                                   config.test_fraction, config.max_train)
    if run_dir is not None and resume is None and (Path(run_dir) / runs.CHECKPOINT).exists():
        raise ValueError(f"run folder {str(run_dir)!r} already holds a run; resume it or choose another folder")
    run_dir = Path(run_dir) if run_dir is not None else runs.new_run_dir(out, f"search-{config.method}")
    if not quiet:
        print(f"run folder: {run_dir}", file=sys.stderr)
    log = runs.RunLog(run_dir / runs.LOG)
    runs.atomic_write_json(config.to_dict(), run_dir / runs.CONFIG)
    searcher = Searcher(config, split, run_dir / runs.CHECKPOINT, quiet=quiet, log=log, callback=callback)
    if resume is not None:
        searcher.load_state(runs.load_checkpoint(run_dir / runs.CHECKPOINT, config.to_dict()))
        log(f"resumed at epoch {searcher.epoch + 1}, step {searcher.step + 1}")
    else:
        log(f"search started: {config.method} on {config.dataset}, seed {config.seed}")
    genotype = searcher.run()
    search_seconds = searcher.seconds()
    log(f"searched genotype: {searcher.net.space.format(genotype)}")

    results: dict[str, Any] = {
        "genotype": searcher.net.space.format(genotype), "method": config.method, "space": config.space,
        "dataset": config.dataset, "seed": config.seed, "config": config.to_dict(),
        "search": {"seconds": search_seconds, "final_val_accuracy":
                   searcher.history["epochs"][-1]["val_accuracy"] if searcher.history["epochs"] else None,
                   "supernet_parameters": count_parameters(searcher.net)},
        "versions": runs.library_versions(),
    }
    if config.retrain_epochs > 0:
        results["derived"] = train_from_scratch(genotype, config, split, config.seed + 1, quiet, "retrain derived")
        log(f"derived architecture: test accuracy {results['derived']['test_accuracy']:.4f}")
        random_genotype = searcher.net.space.random_genotype(random.Random(config.seed))
        results["random"] = train_from_scratch(random_genotype, config, split, config.seed + 1, quiet,
                                               "retrain random")
        log(f"random architecture: test accuracy {results['random']['test_accuracy']:.4f}")
    results["total_seconds"] = search_seconds + sum(results[k]["seconds"] for k in ("derived", "random")
                                                    if k in results)

    paths = {"run_dir": run_dir, "config": run_dir / runs.CONFIG, "checkpoint": run_dir / runs.CHECKPOINT,
             "results": run_dir / runs.RESULTS, "alpha_history": run_dir / runs.ALPHA_HISTORY,
             "log": run_dir / runs.LOG}
    space = get_space(config.space)
    runs.atomic_write_json({"ops": list(space.ops), "edges": [list(e) for e in space.edges],
                            "epochs": list(range(len(searcher.history["alphas"]))),
                            "softmax_alphas": searcher.history["alphas"]}, paths["alpha_history"])
    if searcher.learns_alphas:
        paths["alpha_plot"] = plots.plot_alpha_history(searcher.history["alphas"], space, run_dir / "alphas.png")
    for ct in space.cell_types:
        paths[f"cell_{ct}"] = plots.plot_cell(genotype, space, ct, run_dir / f"cell_{ct}.png")
    results["paths"] = {k: str(v) for k, v in paths.items()}
    results["history"] = searcher.history["epochs"]
    runs.atomic_write_json(results, paths["results"])
    log(f"results written to {paths['results']}")
    return SearchResult(genotype, searcher.history, run_dir, paths, results)
