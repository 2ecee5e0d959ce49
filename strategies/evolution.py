"""Regularized (aging) evolution (Real et al., 2019), as NAS-Bench-201 runs it."""

from __future__ import annotations

from collections import deque
from typing import Any

from supernet import checks

from .base import STRATEGIES, Strategy
from .warm_start import WarmStarted


@STRATEGIES.register("evolution")
class RegularizedEvolution(WarmStarted, Strategy):
    """A population of the `population` latest trials: the first are random, then each child mutates
    (one op or one input edge, `space.mutate`) the best of `sample_size` members drawn at random,
    and the oldest member dies. With a zero-cost warm start (`warm_start="synflow"` etc.), the first
    population is the proxy's best `population` cells of a seeded random pool of `warm_pool`."""

    name = "evolution"

    def __init__(self, space, budget: int, seed: int = 0, population: int = 10, sample_size: int = 3,
                 warm_start: str | None = None, warm_pool: int = 100, proxy_options: dict | None = None) -> None:
        super().__init__(space, budget, seed)
        checks.integer("population", population)
        if checks.integer("sample_size", sample_size) > population:
            raise ValueError(f"sample_size must be an integer in [1, population={population}], got {sample_size!r}")
        self.population_size = population
        self.sample_size = sample_size
        self.population: deque[tuple[Any, float]] = deque()  # (genotype, reward), oldest first
        self._set_warm_start(warm_start, warm_pool, proxy_options)

    def config(self) -> dict[str, Any]:
        return {"population": self.population_size, "sample_size": self.sample_size, **self.warm_config()}

    def _propose(self) -> Any:
        warm = self.warm_cell(self.population_size)
        if warm is not None:
            return warm
        if len(self.population) < self.population_size:
            return self.space.random_genotype(self.rng)
        contenders = self.rng.sample(list(self.population), self.sample_size)
        parent = max(contenders, key=lambda member: member[1])[0]
        return self.space.mutate(parent, self.rng)

    def _observe(self, genotype: Any, reward: float) -> None:
        self.population.append((genotype, reward))
        if len(self.population) > self.population_size:
            self.population.popleft()
