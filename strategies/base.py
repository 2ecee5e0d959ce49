"""The ask/tell protocol every strategy follows, its history, and checkpoints that resume exactly.

A strategy proposes one genotype at a time (`ask`) and learns from its reward (`tell`). Its state is a
pure function of (class, space, budget, seed, config, history): a checkpoint stores exactly these, and
`restore` rebuilds the strategy and replays the history through `ask`/`tell`. Replaying re-draws the
same random numbers, so a resumed search continues as the uninterrupted one would have, for every
strategy alike, and a checkpoint that does not match its strategy fails loudly.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supernet import checks
from supernet.registry import Registry
from supernet.runs import atomic_write_json
from supernet.spaces import CellSpace, get_space

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")
CHECKPOINT_VERSION = 1


@dataclass
class Trial:
    """One evaluated architecture."""

    arch: str  # the space's string form of the genotype
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # evaluation wall time
    timestamp: float = 0.0  # unix time when the reward was told


@dataclass
class Evaluation:
    """What an evaluator answers for one genotype."""

    reward: float
    metrics: dict[str, float]


class Strategy(ABC):
    """Base class: seeded, with an evaluation budget and the full history of its trials.

    Subclasses set `name`, implement `_propose()` (the next genotype) and may override `_observe`
    (learn from a told reward). Constructor keyword arguments other than space/budget/seed must be
    JSON values and are returned by `config()`, so checkpoints can rebuild the strategy.
    """

    name: str

    def __init__(self, space: "str | CellSpace", budget: int, seed: int = 0) -> None:
        checks.integer("budget", budget)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.space = get_space(space)
        self.budget = budget
        self.seed = seed
        self.rng = random.Random(seed)
        self.history: list[Trial] = []
        self._pending: Any = None

    # --- protocol -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether the budget of evaluations is spent."""
        return len(self.history) >= self.budget

    def ask(self) -> Any:
        """The next genotype to evaluate."""
        if self.done:
            raise ValueError(f"the budget of {self.budget} evaluations is spent")
        if self._pending is not None:
            raise ValueError(f"tell the reward of {self.space.format(self._pending)} before asking again")
        self._pending = self.space.validate(self._propose())
        return self._pending

    def tell(self, genotype: Any, reward: float, metrics: dict[str, float] | None = None,
             seconds: float = 0.0, timestamp: float | None = None) -> Trial:
        """Records the reward of the genotype last asked for, and learns from it."""
        if self._pending is None:
            raise ValueError("tell() without a pending ask(); ask for a genotype first")
        arch = self.space.format(genotype)
        if arch != self.space.format(self._pending):
            raise ValueError(f"told the reward of {arch}; expected the pending {self.space.format(self._pending)}")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
        self._observe(self._pending, float(reward))
        self._pending = None
        trial = Trial(arch, float(reward), dict(metrics or {}), float(seconds),
                      time.time() if timestamp is None else float(timestamp))
        self.history.append(trial)
        return trial

    @abstractmethod
    def _propose(self) -> Any:
        """The next genotype (called only while the budget lasts and nothing is pending)."""

    def _observe(self, genotype: Any, reward: float) -> None:
        """Learns from a told reward (random search learns nothing)."""
        return None

    # --- results --------------------------------------------------------------------------------
    def best(self) -> Trial:
        """The trial with the highest reward (the earliest among ties)."""
        if not self.history:
            raise ValueError("no evaluations yet")
        return max(self.history, key=lambda t: t.reward)

    def best_so_far(self) -> list[float]:
        """Best reward after each evaluation."""
        out, best = [], -math.inf
        for t in self.history:
            best = max(best, t.reward)
            out.append(best)
        return out

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments beyond space, budget and seed."""
        return {}

    # --- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs to rebuild this strategy: class, space, budget, seed, config, history."""
        return {"version": CHECKPOINT_VERSION, "strategy": self.name, "space": self.space.name,
                "budget": self.budget, "seed": self.seed, "config": self.config(),
                "history": [asdict(t) for t in self.history]}

    def save(self, path: "str | Path") -> Path:
        """Writes the checkpoint (and history) as JSON, atomically."""
        return atomic_write_json(self.state(), path)

    def replay(self, history: list[Trial]) -> None:
        """Feeds recorded trials through ask/tell, checking each asked genotype matches the record."""
        for i, trial in enumerate(history):
            genotype = self.ask()
            arch = self.space.format(genotype)
            if arch != trial.arch:
                raise ValueError(f"checkpoint does not match {self.name} with seed {self.seed}: trial {i} asked "
                                 f"{arch}, the checkpoint recorded {trial.arch}")
            self.tell(genotype, trial.reward, trial.metrics, trial.seconds, trial.timestamp)


def make_strategy(name: str, space: "str | CellSpace", budget: int, seed: int = 0, **config: Any) -> Strategy:
    """A registered strategy by name."""
    cls = STRATEGIES.get(name)
    # Only option names are checked here: a TypeError raised inside the constructor is a bug, not bad input.
    try:
        inspect.signature(cls).bind(space, budget, seed, **config)
    except TypeError as err:
        raise ValueError(f"bad options for strategy {name!r}: {err}") from None
    return cls(space, budget, seed, **config)


def restore(checkpoint: "str | Path | dict", space: "str | CellSpace | None" = None,
            budget: int | None = None) -> Strategy:
    """Rebuilds a strategy from a checkpoint and replays its history; `budget` may extend it."""
    state = checkpoint
    if not isinstance(checkpoint, dict):
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"checkpoint {str(path)!r} does not exist")
        state = json.loads(path.read_text())
    for key in ("version", "strategy", "space", "budget", "seed", "config", "history"):
        if key not in state:
            raise ValueError(f"checkpoint is missing {key!r}; expected a file written by Strategy.save")
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state['version']!r}; expected {CHECKPOINT_VERSION}")
    if space is not None and get_space(space).name != state["space"]:
        raise ValueError(f"checkpoint was written for space {state['space']!r}, not {get_space(space).name!r}")
    history = [Trial(**t) for t in state["history"]]
    budget = state["budget"] if budget is None else budget
    if budget < len(history):
        raise ValueError(f"budget {budget} is below the {len(history)} evaluations already in the checkpoint")
    strategy = make_strategy(state["strategy"], space if space is not None else state["space"], budget,
                             state["seed"], **state["config"])
    strategy.replay(history)
    return strategy


def search(strategy: Strategy, evaluate: Callable[[Any], Evaluation], checkpoint: "str | Path | None" = None,
           checkpoint_every: int = 1, max_evaluations: int | None = None) -> Strategy:
    """Runs ask -> evaluate -> tell until the budget is spent (or `max_evaluations` more were made).

    With `checkpoint`, the history is saved every `checkpoint_every` evaluations and at the end.
    """
    checks.integer("checkpoint_every", checkpoint_every)
    checks.optional_integer("max_evaluations", max_evaluations, minimum=0)
    made = 0
    try:
        while not strategy.done and (max_evaluations is None or made < max_evaluations):
            genotype = strategy.ask()
            start = time.perf_counter()
            result = evaluate(genotype)
            strategy.tell(genotype, result.reward, result.metrics, time.perf_counter() - start)
            made += 1
            if checkpoint is not None and made % checkpoint_every == 0:
                strategy.save(checkpoint)
    except KeyboardInterrupt:  # keep every told trial, so --resume loses nothing
        if checkpoint is not None:
            strategy.save(checkpoint)
        raise
    if checkpoint is not None:
        strategy.save(checkpoint)
    return strategy
