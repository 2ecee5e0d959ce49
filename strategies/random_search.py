"""Random search: uniform draws from the space, skipping architectures already evaluated."""

from __future__ import annotations

from typing import Any

from .base import STRATEGIES, Strategy
from .warm_start import WarmStarted

# Draws before accepting a repeat: enough to find an unseen architecture unless the space is nearly exhausted.
MAX_REDRAWS = 100


@STRATEGIES.register("random")
class RandomSearch(WarmStarted, Strategy):
    """Samples genotypes with `space.random_genotype`; repeats only when no new one turns up.

    With a zero-cost warm start (`warm_start="synflow"` etc.), the first `warm_pool` draws are evaluated
    in the proxy's order, best first, instead of the order they were drawn in."""

    name = "random"

    def __init__(self, space, budget: int, seed: int = 0, warm_start: str | None = None, warm_pool: int = 100,
                 proxy_options: dict | None = None) -> None:
        super().__init__(space, budget, seed)
        self._set_warm_start(warm_start, warm_pool, proxy_options)

    def config(self) -> dict[str, Any]:
        return self.warm_config()

    def _propose(self) -> Any:
        warm = self.warm_cell(self.warm_pool)
        if warm is not None:
            return warm
        seen = {t.arch for t in self.history}
        for _ in range(MAX_REDRAWS):
            genotype = self.space.random_genotype(self.rng)
            if self.space.format(genotype) not in seen:
                return genotype
        return genotype
