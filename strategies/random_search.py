"""Random search: uniform draws from the space, skipping architectures already evaluated."""

from __future__ import annotations

from typing import Any

from .base import STRATEGIES, Strategy

# Draws before accepting a repeat: enough to find an unseen architecture unless the space is nearly exhausted.
MAX_REDRAWS = 100


@STRATEGIES.register("random")
class RandomSearch(Strategy):
    """Samples genotypes with `space.random_genotype`; repeats only when no new one turns up."""

    name = "random"

    def _propose(self) -> Any:
        seen = {t.arch for t in self.history}
        for _ in range(MAX_REDRAWS):
            genotype = self.space.random_genotype(self.rng)
            if self.space.format(genotype) not in seen:
                return genotype
        return genotype
