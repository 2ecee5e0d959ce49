"""Zero-cost warm start: a strategy's first cells are the best, by a zero-cost proxy at initialisation
(`supernet.proxies`), of a seeded random pool of unseen cells, instead of random ones.

The pool is drawn from the strategy's own generator, so the cells are a deterministic function of
(seed, config, history) and a restored strategy re-draws and re-ranks the same pool. The proxy's wall
time is kept in `seconds`: reported, never counted as an evaluation.
"""

from __future__ import annotations

import random
import time
from typing import Any

from supernet import checks

# Draws per pool cell before accepting a repeat (a nearly exhausted space).
MAX_REDRAWS = 100


class WarmStart:
    """Ranks a seeded random pool of `pool` cells by `proxy` (options go to `supernet.proxies.score`)."""

    def __init__(self, proxy: str, pool: int = 100, options: dict | None = None) -> None:
        from supernet.proxies import check_proxy

        self.proxy = check_proxy(proxy)
        self.pool = checks.integer("warm_pool", pool)
        self.options = dict(options or {})
        self.seconds = 0.0
        self.queue: list[Any] = []  # ranked cells not yet handed out

    def next_cell(self, strategy, count: int) -> Any | None:
        """The strategy's next warm-start cell: the proxy's `count` best of a fresh pool, ranked when the
        strategy asks for its first cell and handed out best first; None once they are all out."""
        if not strategy.history:
            self.queue = self.cells(strategy.space, strategy.rng, count, strategy.seed)
        return self.queue.pop(0) if self.queue else None

    def cells(self, space, rng: random.Random, count: int, seed: int) -> list[Any]:
        """The `count` best of a fresh pool of distinct cells (fewer if the space runs out)."""
        from supernet.proxies import rank_by_proxy

        pool, taken = [], set()
        for _ in range(self.pool):
            for _ in range(MAX_REDRAWS):
                genotype = space.random_genotype(rng)
                if space.format(genotype) not in taken:
                    taken.add(space.format(genotype))
                    pool.append(genotype)
                    break
        start = time.perf_counter()
        ranked = rank_by_proxy(self.proxy, pool, space, seed=seed, **self.options)
        self.seconds += time.perf_counter() - start
        return ranked[:count]


class WarmStarted:
    """What a strategy that takes a zero-cost warm start keeps: its settings (reported in `config()` through
    `warm_config`) and the `WarmStart` (`warm`, None without one)."""

    def _set_warm_start(self, warm_start: str | None, warm_pool: int, proxy_options: dict | None) -> None:
        self.warm_start, self.warm_pool = warm_start, warm_pool
        self.proxy_options = dict(proxy_options or {})
        self.warm = None if warm_start is None else WarmStart(warm_start, warm_pool, self.proxy_options)

    def warm_config(self) -> dict[str, Any]:
        return {"warm_start": self.warm_start, "warm_pool": self.warm_pool, "proxy_options": self.proxy_options}

    def warm_cell(self, count: int) -> Any | None:
        """The next of the proxy's `count` best cells; None without a warm start or once they are all out."""
        return None if self.warm is None else self.warm.next_cell(self, count)

    @property
    def proxy_seconds(self) -> float:
        """Wall time of the zero-cost warm start (never an evaluation)."""
        return 0.0 if self.warm is None else self.warm.seconds
