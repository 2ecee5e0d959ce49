"""Predictor-guided search (BANANAS, White et al., 2021): an ensemble of small MLPs over path encodings
predicts the reward of unseen cells, and the ones it ranks first are evaluated next: part of each batch
is the incumbent's one-op neighbours by predicted mean (a predictor-guided local search), the rest the
best by independent Thompson sampling, an upper confidence bound or the mean.

The candidates are every unseen cell when the space has at most `MAX_EXHAUSTIVE_CELLS` (NAS-Bench-201's
15,625: the acquisition's maximiser is then exact), else (DARTS) neighbours and mutations of the best
cells so far and random cells.

The ensemble is fitted once per batch: the top `batch` candidates are queued and asked one by one, so a
search of `budget` evaluations fits about `budget / batch` times. The first fit trains `epochs` steps from
a fresh initialisation; each later one continues from the previous round's weights for `refit_epochs`
steps (8x fewer, as accurate on NB201; `refit_epochs=0` refits from scratch). Everything (initial cells, mutations,
network initialisations, Thompson draws) is drawn from the strategy's seeded generator, so the state is
a deterministic function of (seed, config, history) and `restore` resumes exactly.

Optional zero-cost warm start (`warm_start="synflow"` etc., `strategies.warm_start`): the first `initial`
cells are the best, by the proxy, of a seeded random pool of `warm_pool` cells, instead of random ones;
the proxy's wall time is kept in `proxy_seconds` (reported, never counted as an evaluation).

A cell that computes the same function as one already evaluated (the same `CellSpace.signature`: in
NAS-Bench-201 its 15,625 cells are 4,930 functions) is never evaluated again (`skip_equivalent=False`
evaluates every distinct arch string): on the 12-epoch table at 100 evaluations, tuning seeds 1000-1299,
that raised the chosen cell's mean `cifar10-test` from 88.83 to 88.90 (the best cell found on 251 seeds
instead of 230).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from typing import Any

import numpy as np

from .base import STRATEGIES, Strategy
from .encoding import DecisionSpace
from .warm_start import WarmStarted

# Candidates drawn per acquisition before giving up on finding new ones (a nearly exhausted space).
MAX_CANDIDATE_DRAWS = 20
# Spaces of at most this many cells (NAS-Bench-201: 15,625) are scored whole at every acquisition, so the
# acquisition's maximiser is exact: 0.14 s a round for NB201 (a 25-epoch refit on 100 cells: 0.04 s; one
# busy core). Larger spaces (DARTS: about 1e18) score sampled candidates: neighbours and mutations of the
# best cells, and random ones.
MAX_EXHAUSTIVE_CELLS = 20_000
# Path encodings longer than this fall back to the one-hot edge encoding alone (the DARTS space).
MAX_PATH_FEATURES = 4096


class PathEncoder:
    """Genotype -> feature vector: one-hot op per edge, plus (when the space is small enough, as
    NAS-Bench-201) one indicator per input-to-output route and op sequence along it, `none` excluded
    (BANANAS's path encoding, per route)."""

    def __init__(self, space) -> None:
        self.space = space
        self.none = space.ops.index("none") if "none" in space.ops else None
        self.real = [k for k in range(len(space.ops)) if k != self.none]
        self.n_ops = len(space.ops)
        self.onehot_size = len(space.cell_types) * space.num_edges * self.n_ops
        all_inputs = space.inputs_per_node is None
        first = space.num_input_nodes
        last = first + space.num_nodes - 1
        sinks = [last] if all_inputs else list(range(first, last + 1))
        routes: list[tuple[int, ...]] = []  # tuples of edge indices, from an input node to a sink

        def extend(node: int, edges: tuple[int, ...]) -> None:
            if node in sinks:
                routes.append(edges)
            for e, (dst, src) in enumerate(space.edges):
                if src == node:
                    extend(dst, edges + (e,))

        for src in range(first):
            extend(src, ())
        routes = [r for r in routes if r]
        self.routes = routes
        sizes = [len(self.real) ** len(r) for r in routes]
        self.path_size = len(space.cell_types) * sum(sizes)
        if self.path_size > MAX_PATH_FEATURES:
            self.routes, self.path_size = [], 0
            sizes = []
        self.offsets = [0] + list(itertools.accumulate(sizes))
        self.rank = {k: i for i, k in enumerate(self.real)}
        self.size = self.onehot_size + self.path_size

    def __call__(self, genotype: Any) -> np.ndarray:
        space = self.space
        x = np.zeros(self.size)
        paths = space.to_paths(genotype)
        per_type = self.offsets[-1]
        for c, ct in enumerate(space.cell_types):
            path = paths[ct]
            for e, k in enumerate(path):
                if k is not None:
                    x[(c * space.num_edges + e) * self.n_ops + k] = 1.0
            for r, route in enumerate(self.routes):
                index = 0
                for e in route:
                    k = path[e]
                    if k is None or k == self.none:
                        break
                    index = index * len(self.real) + self.rank[k]
                else:
                    x[self.onehot_size + c * per_type + self.offsets[r] + index] = 1.0
        return x


class MLPEnsemble:
    """`members` MLPs (ReLU, `layers` hidden layers of `width`) trained together, full batch, with Adam
    on the mean squared error of standardised rewards; numpy, vectorised over the members.

    `fit` starts from fresh weights; `refit` continues from the weights of the last fit (the history
    only grew by a batch, so a few epochs move the old optimum to the new one: the ensemble keeps its
    diversity, which came from the initialisations, at a fraction of the cost)."""

    def __init__(self, members: int = 5, width: int = 32, layers: int = 2, epochs: int = 200,
                 lr: float = 0.01, weight_decay: float = 1e-4) -> None:
        self.members, self.width, self.layers = members, width, layers
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay
        self.params: list[np.ndarray] = []

    def fit(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> "MLPEnsemble":
        """Trains `epochs` full-batch steps from a fresh initialisation drawn from `rng`."""
        dims = [x.shape[1]] + [self.width] * self.layers + [1]
        self.params = []
        for a, b in zip(dims[:-1], dims[1:]):
            self.params.append(rng.normal(0.0, math.sqrt(2.0 / a), (self.members, a, b)))
            self.params.append(np.zeros((self.members, 1, b)))
        return self._train(x, y, self.epochs)

    def refit(self, x: np.ndarray, y: np.ndarray, epochs: int) -> "MLPEnsemble":
        """Trains `epochs` more steps from the current weights (fresh Adam moments) on new data."""
        if not self.params:
            raise ValueError("refit() needs a fitted ensemble; call fit() first")
        return self._train(x, y, epochs)

    def _train(self, x: np.ndarray, y: np.ndarray, epochs: int) -> "MLPEnsemble":
        m, (n, d) = self.members, x.shape
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        t = ((y - self.mean) / self.scale)[None, :, None]  # (1, n, 1)
        moments = [(np.zeros_like(p), np.zeros_like(p)) for p in self.params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, epochs + 1):
            acts = [np.broadcast_to(x, (m, n, d))]
            for i in range(0, len(self.params) - 2, 2):
                acts.append(np.maximum(acts[-1] @ self.params[i] + self.params[i + 1], 0.0))
            out = acts[-1] @ self.params[-2] + self.params[-1]
            grad = 2.0 * (out - t) / n  # d mse / d out, (m, n, 1)
            grads = [None] * len(self.params)
            for i in range(len(self.params) - 2, -1, -2):
                a = acts[i // 2]
                grads[i] = a.transpose(0, 2, 1) @ grad + self.weight_decay * self.params[i]
                grads[i + 1] = grad.sum(axis=1, keepdims=True)
                if i:
                    grad = (grad @ self.params[i].transpose(0, 2, 1)) * (a > 0)
            lr = self.lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            for p, g, (mo, ve) in zip(self.params, grads, moments):
                mo *= beta1
                mo += (1 - beta1) * g
                ve *= beta2
                ve += (1 - beta2) * g * g
                p -= lr * mo / (np.sqrt(ve) + eps)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(members, candidates) predicted rewards."""
        # The first layer of every member as one (candidates, members * width) product: 1.5x faster than a
        # broadcast batched product over all 15,625 NB201 cells.
        first = self.params[0]
        m, d, w = first.shape
        h = (x @ first.transpose(1, 0, 2).reshape(d, m * w)).reshape(len(x), m, w).transpose(1, 0, 2)
        h = np.maximum(h + self.params[1], 0.0)
        for i in range(2, len(self.params) - 2, 2):
            h = np.maximum(h @ self.params[i] + self.params[i + 1], 0.0)
        return (h @ self.params[-2] + self.params[-1])[..., 0] * self.scale + self.mean


class AllCells:
    """Every cell of a small space, in `DecisionSpace` order, with its arch string, signature and features;
    built once per process and space (0.6 s for NB201's 15,625 cells, one idle core) and shared by every
    search."""

    _built: dict[tuple, "AllCells | None"] = {}

    def __init__(self, space, genotypes: list[Any], encoder: PathEncoder) -> None:
        self.genotypes = genotypes
        self.archs = [space.format(g) for g in genotypes]
        self.signatures = [space.signature(g) for g in genotypes]
        self.features = np.stack([encoder(g) for g in genotypes])

    @classmethod
    def of(cls, space, encoder: PathEncoder) -> "AllCells | None":
        """The space's cells, or None when it has more than MAX_EXHAUSTIVE_CELLS."""
        key = (type(space), space.name, tuple(space.ops), MAX_EXHAUSTIVE_CELLS)
        if key not in cls._built:
            genotypes = DecisionSpace(space).all_genotypes(MAX_EXHAUSTIVE_CELLS)
            cls._built[key] = None if genotypes is None else cls(space, genotypes, encoder)
        return cls._built[key]


@STRATEGIES.register("bananas")
class Bananas(WarmStarted, Strategy):
    """BANANAS: `initial` random cells (or the best of a zero-cost-ranked pool), then per round an
    ensemble fitted on every trial so far scores the candidates: every unseen cell of a small space (see
    the module docstring); in a larger one every one-op neighbour of the `neighbourhood` best trials,
    `mutants` chains of 1 to `max_edits` mutations of each of the `parents` best trials, and
    `random_candidates` random cells, all unseen (with `skip_equivalent`, no cell computes the same function
    as an evaluated one). Of the `batch` cells evaluated next, up to
    `local_search` are the best trial's unseen neighbours with the highest predicted mean, the rest the
    best by acquisition (`its`: independent Thompson sampling from the ensemble's mean and spread; `ucb`:
    mean + `beta` * spread; `mean`: greedy). Rewards below their `floor_quantile` quantile are raised to
    it before fitting, so that the worst cells (disconnected ones score 10%) do not dominate the fit.
    The defaults were tuned on the 12-epoch NB201 table at 100 evaluations on seeds 1000-1399, apart
    from the seeds 0-99 the README reports."""

    name = "bananas"
    ACQUISITIONS = ("its", "ucb", "mean")

    def __init__(self, space, budget: int, seed: int = 0, initial: int = 20, batch: int = 10,
                 parents: int = 10, neighbourhood: int = 5, mutants: int = 20, max_edits: int = 2,
                 random_candidates: int = 500, local_search: int = 5, members: int = 5, width: int = 32,
                 epochs: int = 200, refit_epochs: int = 25, acquisition: str = "its", beta: float = 0.5,
                 floor_quantile: float = 0.5, skip_equivalent: bool = True, warm_start: str | None = None,
                 warm_pool: int = 100, proxy_options: dict | None = None) -> None:
        super().__init__(space, budget, seed)
        for key, value, low in (("initial", initial, 1), ("batch", batch, 1), ("parents", parents, 1),
                                ("neighbourhood", neighbourhood, 0), ("mutants", mutants, 0), ("max_edits", max_edits, 1),
                                ("random_candidates", random_candidates, 0), ("local_search", local_search, 0),
                                ("members", members, 1),
                                ("width", width, 1), ("epochs", epochs, 1), ("refit_epochs", refit_epochs, 0),
                                ("warm_pool", warm_pool, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if acquisition not in self.ACQUISITIONS:
            raise ValueError(f"unknown acquisition {acquisition!r}; expected one of {list(self.ACQUISITIONS)}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if local_search > batch:
            raise ValueError(f"local_search must be at most batch={batch} (cells per round), got {local_search}")
        if mutants == 0 and random_candidates == 0 and neighbourhood == 0:
            raise ValueError("neighbourhood, mutants and random_candidates cannot all be 0: there would be no "
                             "candidates")
        self.initial, self.batch, self.parents, self.mutants = initial, batch, parents, mutants
        self.neighbourhood = neighbourhood
        self.max_edits, self.random_candidates, self.local_search = max_edits, random_candidates, local_search
        self.members, self.width, self.epochs, self.refit_epochs = members, width, epochs, refit_epochs
        self.acquisition, self.beta = acquisition, float(beta)
        if isinstance(floor_quantile, bool) or not isinstance(floor_quantile, (int, float)) or \
                not 0 <= floor_quantile < 1:
            raise ValueError(f"floor_quantile must be in [0, 1), got {floor_quantile!r}")
        self.floor_quantile = float(floor_quantile)
        if not isinstance(skip_equivalent, bool):
            raise ValueError(f"skip_equivalent must be true or false, got {skip_equivalent!r}")
        self.skip_equivalent = skip_equivalent
        self._set_warm_start(warm_start, warm_pool, proxy_options)
        self.encoder = PathEncoder(self.space)
        self.all_cells = AllCells.of(self.space, self.encoder)
        self._codes: dict[str, np.ndarray] = {}
        self.queue: list[Any] = []
        self.features: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.seen: set[Hashable] = set()  # the `_key` of every evaluated cell
        self.evaluated: set[str] = set()  # the arch string of every evaluated cell
        self.model: MLPEnsemble | None = None
        self.fits = 0

    def config(self) -> dict[str, Any]:
        return {"initial": self.initial, "batch": self.batch, "parents": self.parents,
                "neighbourhood": self.neighbourhood, "mutants": self.mutants,
                "max_edits": self.max_edits, "random_candidates": self.random_candidates, "local_search": self.local_search,
                "members": self.members, "width": self.width, "epochs": self.epochs,
                "refit_epochs": self.refit_epochs,
                "acquisition": self.acquisition, "beta": self.beta,
                "floor_quantile": self.floor_quantile, "skip_equivalent": self.skip_equivalent,
                **self.warm_config()}

    # --- proposals ------------------------------------------------------------------------------
    def _propose(self) -> Any:
        while self.queue:
            genotype = self.queue.pop(0)
            if self.space.format(genotype) not in self.evaluated:
                return genotype
        if len(self.history) < self.initial:
            warm = self.warm_cell(self.initial)
            while warm is not None and self._key(warm) in self.seen:
                warm = self.warm_cell(self.initial)
            return warm if warm is not None else self._random_unseen()
        self.queue = self._acquire()
        if not self.queue:  # the space is (nearly) exhausted: fall back to any unseen random cell
            return self._random_unseen()
        return self.queue.pop(0)

    def _random_unseen(self) -> Any:
        """A random cell unlike any evaluated one; failing that (a nearly exhausted space), a random cell not
        evaluated itself."""
        genotype, fallback = None, None
        for _ in range(MAX_CANDIDATE_DRAWS * 5):
            genotype = self.space.random_genotype(self.rng)
            if self._key(genotype) not in self.seen:
                return genotype
            if fallback is None and self.space.format(genotype) not in self.evaluated:
                fallback = genotype
        return fallback if fallback is not None else genotype

    def _fresh(self, archs: list[str], keys: list[Hashable]) -> list[int]:
        """Indices of the cells unlike any evaluated one; once there are none (a nearly exhausted space),
        of the cells not evaluated themselves."""
        fresh = [i for i, key in enumerate(keys) if key not in self.seen]
        return fresh or [i for i, arch in enumerate(archs) if arch not in self.evaluated]

    def _candidates(self) -> tuple[list[str], list[Any], list[Hashable], np.ndarray]:
        """Candidate cells (arch strings, genotypes, keys, features) in a fixed order: every fresh cell of a
        small space (`_fresh`), else sampled ones."""
        every = self.all_cells
        if every is not None:
            keys = every.signatures if self.skip_equivalent else every.archs
            keep = self._fresh(every.archs, keys)
            return ([every.archs[i] for i in keep], [every.genotypes[i] for i in keep], [keys[i] for i in keep],
                    every.features[keep])
        sampled = self._sampled_candidates()
        archs, genotypes = list(sampled), list(sampled.values())
        keys = [self._key(g) for g in genotypes]
        keep = self._fresh(archs, keys)
        archs, genotypes, keys = ([values[i] for i in keep] for values in (archs, genotypes, keys))
        x = np.stack([self._encode(a, g) for a, g in zip(archs, genotypes)]) if archs else np.zeros((0, self.encoder.size))
        return archs, genotypes, keys, x

    def _sampled_candidates(self) -> dict[str, Any]:
        """Cells not evaluated, arch -> genotype, in the order they were generated."""
        order = sorted(range(len(self.history)), key=lambda i: (-self.history[i].reward, i))
        parents = [self.space.parse(self.history[i].arch) for i in order[:self.parents]]
        out: dict[str, Any] = {}

        def add(genotype: Any) -> None:
            arch = self.space.format(genotype)
            if arch not in self.evaluated and arch not in out:
                out[arch] = genotype

        for parent in parents[:self.neighbourhood]:
            for child in self._neighbours(parent):
                add(child)
        for parent in parents:
            for _ in range(self.mutants):
                child = parent
                for _ in range(self.rng.randint(1, self.max_edits)):
                    child = self.space.mutate(child, self.rng)
                add(child)
        for _ in range(self.random_candidates):
            add(self.space.random_genotype(self.rng))
        return out

    def _neighbours(self, genotype: Any) -> list[Any]:
        """Every cell one op change away (on an edge the cell uses; never to `none` where a used edge
        cannot carry it), in a fixed order."""
        paths = self.space.to_paths(genotype)
        ops = self.encoder.real if self.space.inputs_per_node is not None else range(len(self.space.ops))
        out = []
        for ct in self.space.cell_types:
            for e, k in enumerate(paths[ct]):
                if k is None:
                    continue
                for other in ops:
                    if other != k:
                        changed = dict(paths)
                        changed[ct] = paths[ct][:e] + (other,) + paths[ct][e + 1:]
                        try:
                            out.append(self.space.validate(self.space.from_paths(changed)))
                        except ValueError:
                            continue
        return out

    def _acquire(self) -> list[Any]:
        archs, genotypes, keys, candidates = self._candidates()
        if not archs:
            return []
        x = np.stack(self.features)
        y = np.asarray(self.rewards)
        if self.floor_quantile > 0:  # the worst cells (e.g. disconnected ones) would dominate the fit
            y = np.maximum(y, np.quantile(y, self.floor_quantile))
        rng = np.random.default_rng(self.rng.getrandbits(63))
        if self.model is None or self.refit_epochs == 0:
            self.model = MLPEnsemble(self.members, self.width, epochs=self.epochs).fit(x, y, rng)
        else:
            self.model.refit(x, y, self.refit_epochs)
        self.fits += 1
        pred = self.model.predict(candidates)
        mean, std = pred.mean(axis=0), pred.std(axis=0)
        if self.acquisition == "its":
            score = mean + std * rng.standard_normal(len(archs))
        elif self.acquisition == "ucb":
            score = mean + self.beta * std
        else:
            score = mean
        # Rounded so that last-bit differences between machines do not reorder near-ties.
        score, mean = np.round(score, 9), np.round(mean, 9)
        picks = []
        if self.local_search:  # the incumbent's unseen neighbours with the best predicted mean
            incumbent = self.space.parse(self.best().arch)
            near = {self.space.format(g) for g in self._neighbours(incumbent)}
            local = [i for i, arch in enumerate(archs) if arch in near]
            picks = sorted(local, key=lambda i: (-mean[i], i))[:self.local_search]
        batch, taken = [], set()  # one cell per key: equivalent cells would be evaluated twice
        for i in itertools.chain(picks, np.argsort(-score, kind="stable")):
            if keys[i] not in taken:
                taken.add(keys[i])
                batch.append(genotypes[i])
                if len(batch) == self.batch:
                    break
        return batch

    def _key(self, genotype: Any) -> Hashable:
        """What `seen` holds of a cell: its signature, or with `skip_equivalent=False` its arch string."""
        return self.space.signature(genotype) if self.skip_equivalent else self.space.format(genotype)

    def _encode(self, arch: str, genotype: Any) -> np.ndarray:
        if arch not in self._codes:
            self._codes[arch] = self.encoder(genotype)
        return self._codes[arch]

    def _observe(self, genotype: Any, reward: float) -> None:
        arch = self.space.format(genotype)
        self.evaluated.add(arch)
        self.seen.add(self._key(genotype))
        self.features.append(self._encode(arch, genotype))
        self.rewards.append(reward)
