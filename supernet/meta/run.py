"""A meta-learning run: meta-train, compare with two baselines on the same test episodes, write a run folder.

Learners, in order, all from the same initialisation (same seed) and the same meta-training episodes:

    meta    the method over weights and alphas (MetaNAS-style): adapted genotype per task.
    fixed   the same method with the alphas frozen at their initial values (a fixed architecture).
    none    no meta-training: the initial network adapted on each support set with the same inner loop.

Every learner is tested on the same `test_episodes` episodes of the meta-test classes; accuracies
come with 95% confidence intervals (1.96 standard errors over episodes), as the literature reports.
The whole state goes into one checkpoint, so an interrupted run resumes to identical results on the CPU.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .. import checks, runs
from ..devices import resolve_device
from ..search_network import SearchNetwork
from ..spaces import list_spaces
from ..tensorboard import Events, open_events
from ..tensorboard import check_available as check_tensorboard
from .episodes import Episode, EpisodeSampler, FewShotDataset, digits_fewshot, split_by_class, split_fractions
from .learner import METHODS, MetaLearner, NonFiniteUpdate, learning_rate
from .omniglot import load_omniglot
from .plots import plot_meta_curves

DATASETS = ("digits", "omniglot")
LEARNERS = ("meta", "fixed", "none")
CURVES = "meta_curves.png"
ADAM_META_LR = 3e-3  # on the digits default: 3e-3 reached 0.68 meta-val accuracy in 150 steps, 1e-3 0.62, 1e-2 0.66
REPTILE_META_LR = 0.5  # theta <- theta + 0.5 (mean adapted theta - theta); Reptile anneals from 1.0


@dataclass
class MetaConfig:
    """Everything that decides a meta-learning run's result. Defaults: a few minutes on 2 CPU cores."""

    method: str = "fomaml"  # maml (second order) | fomaml | reptile; fomaml: a third of maml's cost here
    dataset: str = "digits"  # embedded 8x8 digits; "omniglot" reads data_dir
    data_dir: str | None = None  # omniglot: a zip, or a folder of images_background*.zip
    image_size: int = 28  # omniglot images are resized to this (the literature's 28x28)
    rotations: bool = True  # rotated copies (90/180/270) as extra classes: digits 10 -> 40 classes
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # of class groups: meta-train/val/test
    split_seed: int = 0
    space: str = "nb201"
    C: int = 4  # nb201 at C=4, one cell per stage: the per-op overhead, not the width, sets the cost
    layers: int = 1
    n_way: int = 5
    k_shot: int = 1
    query: int = 5  # query examples per class in meta-training episodes
    test_query: int = 15  # query examples per class in meta-validation and meta-test episodes
    meta_steps: int = 300
    meta_batch: int = 8  # tasks per meta-step, vectorised with vmap (8 cost about 1.5x of 4)
    inner_steps: int = 3
    test_inner_steps: int = 3
    inner_lr_weights: float = 0.4  # MAML's Omniglot inner rate
    inner_lr_alphas: float = 0.4
    meta_lr_weights: float | None = None  # None: 3e-3 (Adam) for maml and fomaml; reptile's interpolation rate 0.5
    meta_lr_alphas: float | None = None  # None: as meta_lr_weights
    val_every: int = 50
    val_episodes: int = 100
    test_episodes: int = 600
    baselines: bool = True  # also train/test the fixed-architecture and no-meta-training baselines
    checkpoint_every: int = 50  # meta-steps between checkpoints (and at the end of each learner)
    seed: int = 0
    learners: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        checks.choice("meta-learning method", self.method, METHODS)
        checks.choice("dataset", self.dataset, DATASETS)
        if self.dataset == "omniglot" and not self.data_dir:
            raise ValueError("dataset='omniglot' needs data_dir: a zip or a folder of Omniglot zips")
        checks.choice("space", self.space, list_spaces())
        self.split_fractions = split_fractions(self.split_fractions)
        for name in ("C", "layers", "n_way", "k_shot", "query", "test_query", "meta_steps", "meta_batch",
                     "inner_steps", "test_inner_steps", "val_every", "val_episodes", "test_episodes"):
            checks.integer(name, getattr(self, name))
        checks.integer("image_size", self.image_size, minimum=4)
        for name in ("checkpoint_every", "seed", "split_seed"):
            checks.integer(name, getattr(self, name), minimum=0)
        for name in ("rotations", "baselines"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        default_meta_lr = REPTILE_META_LR if self.method == "reptile" else ADAM_META_LR
        if self.meta_lr_weights is None:
            self.meta_lr_weights = default_meta_lr
        if self.meta_lr_alphas is None:
            self.meta_lr_alphas = self.meta_lr_weights
        for name in ("inner_lr_weights", "inner_lr_alphas", "meta_lr_weights", "meta_lr_alphas"):
            setattr(self, name, learning_rate(name, getattr(self, name)))
        self.learners = LEARNERS if self.baselines else ("meta",)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "MetaConfig":
        names = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown meta-learning options {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def load_fewshot(config: MetaConfig) -> dict[str, FewShotDataset]:
    """The config's dataset split by class into meta-train, meta-validation and meta-test."""
    if config.dataset == "omniglot":
        dataset = load_omniglot(config.data_dir, config.image_size, config.rotations)
    else:
        dataset = digits_fewshot(config.rotations)
    return split_by_class(dataset, config.split_fractions, config.split_seed)


def build_network(config: MetaConfig, in_channels: int) -> SearchNetwork:
    """The SearchNetwork every learner starts from: the same weights and alphas for the same seed."""
    torch.manual_seed(config.seed)
    return SearchNetwork(config.space, C=config.C, layers=config.layers, num_classes=config.n_way,
                         in_channels=in_channels, mixing="softmax")


def build_learner(config: MetaConfig, name: str, in_channels: int, device: "str | torch.device | None" = None
                  ) -> MetaLearner:
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; expected one of {list(LEARNERS)}")
    return MetaLearner(build_network(config, in_channels), config.method, config.inner_steps,
                       config.inner_lr_weights, config.inner_lr_alphas, config.meta_lr_weights,
                       config.meta_lr_alphas, learn_alphas=name != "fixed", device=device)


def check_episodes(config: MetaConfig, splits: dict[str, FewShotDataset]) -> None:
    """ValueError unless every split can give the config's episodes (N classes, K + query examples each)."""
    for name, split in splits.items():
        EpisodeSampler(split, config.n_way, config.k_shot, config.query if name == "train" else config.test_query)


def fixed_episodes(dataset: FewShotDataset, config: MetaConfig, count: int, seed: int,
                   chunk: int = 100) -> Iterator[Episode]:
    """The same `count` evaluation episodes every time (a fresh sampler per call), in stacks of `chunk`."""
    sampler = EpisodeSampler(dataset, config.n_way, config.k_shot, config.test_query, seed)
    for start in range(0, count, chunk):
        yield sampler.sample_tasks(min(chunk, count - start))


def evaluate(learner: MetaLearner, dataset: FewShotDataset, config: MetaConfig, count: int, seed: int,
             with_genotypes: bool = False) -> tuple[torch.Tensor, list[Any]]:
    """Per-episode query accuracy after `test_inner_steps` of adaptation (and the adapted genotypes)."""
    accs, genotypes = [], []
    for episodes in fixed_episodes(dataset, config, count, seed):
        adapted, stats = learner.adapt_many(episodes, config.test_inner_steps)
        accs.append(stats["query_accuracy"])
        if with_genotypes:
            genotypes += learner.genotypes(adapted)
    return torch.cat(accs), genotypes


def confidence_interval(accs: torch.Tensor) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval) of per-episode accuracies."""
    n = accs.numel()
    std = accs.std(unbiased=True).item() if n > 1 else 0.0
    return accs.mean().item(), 1.96 * std / math.sqrt(n)


@dataclass
class MetaResult:
    """What a meta-learning run produced; `results` is what results.json holds."""

    run_dir: Path
    paths: dict[str, Path]
    results: dict
    learners: dict[str, MetaLearner]

    def accuracy(self, name: str = "meta") -> float:
        return self.results["test"][name]["accuracy"]


class MetaRun:
    """Meta-trains the config's learners in turn, checkpointing its whole state once `write_to` names a folder."""

    def __init__(self, config: MetaConfig, splits: dict[str, FewShotDataset], quiet: bool = True,
                 callback: Callable[["MetaRun"], None] | None = None,
                 device: "str | torch.device | None" = None) -> None:
        check_episodes(config, splits)
        self.config, self.splits, self.quiet, self.callback = config, splits, quiet, callback
        self.checkpoint_path: Path | None = None
        self.log: Callable[[str], None] = lambda message: None
        self.events = Events()  # TensorBoard (a no-op unless the run opens them)
        self.saved_at: tuple[str, int] | None = None  # (phase, step) of the checkpoint on disk
        in_channels = splits["train"].image_shape[0]
        self.learners = {name: build_learner(config, name, in_channels, device) for name in config.learners}
        trained = [n for n in config.learners if n != "none"]
        self.samplers = {n: EpisodeSampler(splits["train"], config.n_way, config.k_shot, config.query, config.seed)
                         for n in trained}
        self.history = {n: {"train": [], "val": []} for n in trained}
        self.phase = trained[0]
        self.step = 0  # meta-steps done in the current phase
        self.elapsed = 0.0  # meta-training seconds before this process (resumed runs)
        self._started: float | None = None

    def write_to(self, run_dir: Path) -> None:
        """From now on, checkpoints go to `run_dir` and log lines to its log file."""
        self.checkpoint_path, self.log = run_dir / runs.CHECKPOINT, runs.RunLog(run_dir / runs.LOG)

    def state(self) -> dict:
        return {"config": self.config.to_dict(), "phase": self.phase, "step": self.step, "elapsed": self.seconds(),
                "learners": {n: lr.state_dict() for n, lr in self.learners.items()},
                "samplers": {n: s.state_dict() for n, s in self.samplers.items()}, "history": self.history}

    def load_state(self, state: dict) -> None:
        for n, learner in self.learners.items():
            learner.load_state_dict(state["learners"][n])
        for n, sampler in self.samplers.items():
            sampler.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v  # generator states: CPU
                                     for k, v in state["samplers"][n].items()})
        self.history, self.phase, self.step, self.elapsed = state["history"], state["phase"], state["step"], \
            state["elapsed"]
        self.saved_at = (self.phase, self.step)

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def save(self) -> None:
        if self.checkpoint_path is not None:
            runs.save_checkpoint(self.checkpoint_path, self.state())
            self.saved_at = (self.phase, self.step)

    def validate(self, name: str) -> None:
        accs, _ = evaluate(self.learners[name], self.splits["val"], self.config, self.config.val_episodes,
                           self.config.seed + 1)
        self.history[name]["val"].append({"step": self.step, "accuracy": accs.mean().item()})
        self.log(f"{name}: meta-step {self.step}, meta-validation accuracy {accs.mean().item():.4f}")
        self.events.scalars(self.step, {"accuracy": accs.mean().item()}, prefix=f"{name}/meta_val/")

    def run(self) -> None:
        """Meta-trains every learner that trains, from wherever the state stands."""
        c = self.config
        self._started = time.perf_counter()
        names = list(self.samplers)
        for name in names[names.index(self.phase) if self.phase in names else len(names):]:
            self.phase, self.step = name, self.step if self.phase == name else 0
            learner, history = self.learners[name], self.history[name]
            if self.step == 0 and not history["val"]:
                self.validate(name)
            progress = range(self.step, c.meta_steps)
            if not self.quiet:
                from tqdm import tqdm
                progress = tqdm(progress, desc=f"meta-train {name}", initial=self.step, total=c.meta_steps)
            for _ in progress:
                try:
                    stats = learner.meta_step(self.samplers[name].sample_tasks(c.meta_batch))
                except NonFiniteUpdate as err:  # nothing was applied or saved
                    kept = "no checkpoint was written" if self.saved_at is None else \
                        f"the last checkpoint, {str(self.checkpoint_path)!r} (learner {self.saved_at[0]!r}, " \
                        f"meta-step {self.saved_at[1]}), is kept"
                    raise ValueError(f"meta-training {name!r} stopped at meta-step {self.step + 1}: {err}; {kept}; "
                                     "lower the inner or meta learning rates") from None
                self.step += 1
                history["train"].append({"step": self.step, **stats})
                self.events.scalars(self.step, stats, prefix=f"{name}/meta_train/")
                if self.step % c.val_every == 0 or self.step == c.meta_steps:
                    self.validate(name)
                finished = self.step == c.meta_steps
                if finished:  # the checkpoint then says: start the next learner
                    following = names[names.index(name) + 1:]
                    self.phase, self.step = (following[0] if following else "done"), 0
                if finished or c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save()
                if self.callback is not None:
                    self.callback(self)
        self.phase, self.step = "done", 0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a meta run, after its run folder was made; `run_dir` is the folder to resume."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _resolve_config(options: dict, resume: Path | None) -> MetaConfig:
    if resume is None:
        return MetaConfig.from_dict(options)
    return MetaConfig.from_dict(runs.resume_config(resume, options))


def meta_learn(*, resume: "str | Path | None" = None, out: "str | Path" = "runs", run_dir: "str | Path | None" = None,
               quiet: bool = True, callback: Callable[[MetaRun], None] | None = None,
               device: "str | torch.device" = "auto", tensorboard: bool = False, **options: Any) -> MetaResult:
    """Meta-trains, tests against the baselines on the same episodes, and writes a run folder.

    `options` are `MetaConfig` fields. `run_dir` must be new or empty (default: a new folder under
    `out`); `resume=RUN_DIR` continues an interrupted run (options given then must match it).
    `callback(run)` is called after every meta-step (monitoring, tests). Ctrl-C after the run folder
    exists raises `RunInterrupted`, which names it. `device`: auto|cpu|cuda|cuda:N (auto: a GPU when
    there is one); a checkpoint written on one device resumes on another. `tensorboard=True` also writes
    TensorBoard events (meta-training losses, meta-validation and test accuracies, the curves) into
    `<run_dir>/tensorboard/` (the optional tensorboard extra).
    """
    check_tensorboard(tensorboard)
    device = resolve_device(device)
    if resume is not None:
        resume = Path(resume)
        if not resume.is_dir():
            raise ValueError(f"cannot resume: {str(resume)!r} is not a run folder")
        if run_dir is not None and Path(run_dir) != resume:
            raise ValueError(f"resume ({str(resume)!r}) and run_dir ({str(run_dir)!r}) name different folders; "
                             "give one")
        run_dir = resume
    # every check before the run folder is opened, so a run that cannot start leaves no folder behind
    config = _resolve_config(options, resume)
    splits = load_fewshot(config)
    meta_run = MetaRun(config, splits, quiet, callback, device)
    if resume is not None:
        meta_run.load_state(runs.load_checkpoint(resume / runs.CHECKPOINT, config.to_dict(), map_location=device))
    run_dir = runs.open_run_dir(run_dir, out, f"meta-{config.method}", resume=resume is not None)
    try:
        meta_run.events = open_events(run_dir, tensorboard)
        return _meta_learn_in(run_dir, meta_run, resumed=resume is not None, quiet=quiet)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None


def _meta_learn_in(run_dir: Path, meta_run: MetaRun, resumed: bool, quiet: bool) -> MetaResult:
    """The run itself, once its folder is open: meta-train (or go on), test, write the results."""
    config, splits = meta_run.config, meta_run.splits
    if not quiet:
        print(f"run folder: {run_dir}", file=sys.stderr)
    meta_run.write_to(run_dir)
    log = meta_run.log
    if resumed:
        log(f"resumed: {meta_run.phase}, meta-step {meta_run.step}")
    else:
        runs.atomic_write_json(config.to_dict(), run_dir / runs.CONFIG)
        meta_run.save()  # a checkpoint from the start: an interrupted run can always be resumed
        log(f"meta-learning started: {config.method} on {config.dataset}, {config.n_way}-way {config.k_shot}-shot, "
            f"seed {config.seed}; classes meta-train/val/test "
            f"{[splits[s].num_classes for s in ('train', 'val', 'test')]}")
    meta_run.run()
    train_seconds = meta_run.seconds()

    started = time.perf_counter()
    test: dict[str, dict] = {}
    for name, learner in meta_run.learners.items():
        accs, genotypes = evaluate(learner, splits["test"], config, config.test_episodes, config.seed + 2,
                                   with_genotypes=name == "meta")
        mean, ci = confidence_interval(accs)
        test[name] = {"accuracy": mean, "ci95": ci, "episodes": accs.numel()}
        if genotypes:
            space = learner.network.space
            meta_genotype = learner.network.derive()
            counts = Counter(space.format(g) for g in genotypes)
            test[name].update({"meta_genotype": space.format(meta_genotype), "distinct_adapted_genotypes": len(counts),
                               "share_differing_from_meta_genotype": sum(g != meta_genotype for g in genotypes)
                               / len(genotypes), "most_common_adapted_genotypes": counts.most_common(3)})
        log(f"{name}: test accuracy {100 * mean:.2f}% +- {100 * ci:.2f} over {accs.numel()} episodes")
    test_seconds = time.perf_counter() - started

    paths = {"run_dir": run_dir, "config": run_dir / runs.CONFIG, "checkpoint": run_dir / runs.CHECKPOINT,
             "results": run_dir / runs.RESULTS, "log": run_dir / runs.LOG}
    no_meta = meta_run.history["meta"]["val"][0]["accuracy"] if meta_run.history["meta"]["val"] else None
    paths["curves"] = plot_meta_curves(meta_run.history, run_dir / CURVES, no_meta)
    results = {"config": config.to_dict(), "test": test, "history": meta_run.history,
               "classes": {s: splits[s].num_classes for s in ("train", "val", "test")},
               "seconds": {"meta_training": train_seconds, "testing": test_seconds},
               "versions": runs.library_versions(), "paths": {k: str(v) for k, v in paths.items()}}
    runs.atomic_write_json(results, paths["results"])
    meta_run.events.scalars(0, {f"{name}_test_accuracy": t["accuracy"] for name, t in test.items()}, prefix="test/")
    meta_run.events.image_file("meta_curves", paths["curves"])
    meta_run.events.close()
    log(f"results written to {paths['results']}")
    return MetaResult(run_dir, paths, results, meta_run.learners)


def describe(result: MetaResult) -> str:
    """The test table as text: accuracy with 95% confidence interval per learner."""
    c = MetaConfig.from_dict(result.results["config"])
    labels = {"meta": f"meta-learned architecture + weights ({c.method})",
              "fixed": f"fixed architecture, alphas frozen ({c.method})",
              "none": "no meta-training (adapt from initialisation)"}
    lines = [f"{c.n_way}-way {c.k_shot}-shot on {c.dataset} meta-test classes, {c.test_inner_steps} adaptation "
             f"steps, 95% confidence intervals:"]
    for name, r in result.results["test"].items():
        lines.append(f"  {labels[name]:<52} {100 * r['accuracy']:6.2f}% +- {100 * r['ci95']:.2f}"
                     f"  ({r['episodes']} episodes)")
    meta = result.results["test"]["meta"]
    lines.append(f"  meta genotype: {meta['meta_genotype']}; adapted genotypes: {meta['distinct_adapted_genotypes']} "
                 f"distinct, {100 * meta['share_differing_from_meta_genotype']:.0f}% of episodes differ from it")
    return "\n".join(lines)


__all__ = ["MetaConfig", "MetaResult", "MetaRun", "RunInterrupted", "meta_learn", "describe", "evaluate", "confidence_interval",
           "load_fewshot", "build_learner", "build_network"]
