"""Evaluators answer a genotype with a reward and its metrics: a tabular benchmark, or a trained
supernet whose subnetworks inherit its weights."""

from __future__ import annotations

import csv
import functools
import io
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from supernet import SearchNetwork, checks, devices, distributed, preserved_batchnorm, recalibrate_batchnorm
from supernet.spaces import CellSpace, get_space

from . import tables
from .base import Evaluation
from .metrics import Reward, classification_metrics, measure_latency, profile, reward_of

Batch = tuple[torch.Tensor, torch.Tensor]
EMBEDDED_TABLES = tuple(tables.EMBEDDED)  # names TabularBenchmark.load accepts besides paths


class TabularBenchmark:
    """A table of per-architecture metrics: a CSV with an `arch` column (the space's string form) and one
    numeric column per metric, as `nb201_12epoch.csv` and `nb201_latency.csv`. Lookups are dict hits."""

    NON_METRICS = ("index", "arch")

    def __init__(self, rows: dict[str, dict[str, float]], metrics: Sequence[str], space: "str | CellSpace",
                 source: str = "table") -> None:
        self.rows, self.metrics, self.space, self.source = rows, tuple(metrics), get_space(space), source

    @classmethod
    def load(cls, path: "str | Path", space: "str | CellSpace" = "nb201") -> "TabularBenchmark":
        """Reads a benchmark CSV: a path, or the name of a table shipped with the package (`EMBEDDED_TABLES`)."""
        if isinstance(path, str) and path in EMBEDDED_TABLES and not Path(path).exists():
            return cls._embedded(path, get_space(space).name)
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"benchmark table {str(path)!r} does not exist; expected a CSV with an 'arch' column "
                             f"or one of the embedded tables {list(EMBEDDED_TABLES)}")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                columns, rows = cls._read_rows(csv.DictReader(f), str(path))
        except (UnicodeDecodeError, csv.Error) as err:  # a binary or malformed file
            raise ValueError(f"benchmark table {str(path)!r} is not a readable CSV text file: {err}") from None
        except OSError as err:
            raise ValueError(f"cannot read benchmark table {str(path)!r}: {err.strerror or err}") from None
        if not rows:
            raise ValueError(f"benchmark table {str(path)!r} has no rows")
        return cls(rows, [c for c in columns if c not in cls.NON_METRICS], space, str(path))

    @classmethod
    @functools.cache
    def _embedded(cls, name: str, space: str) -> "TabularBenchmark":
        # parsed once per process (15,625 rows: about 0.3 s)
        columns, rows = cls._read_rows(csv.DictReader(io.StringIO(tables.read_text(name))), f"embedded:{name}")
        return cls(rows, [c for c in columns if c not in cls.NON_METRICS], space, f"embedded:{name}")

    @classmethod
    def _read_rows(cls, reader: csv.DictReader, source: str) -> tuple[list[str], dict[str, dict[str, float]]]:
        """The columns and the rows of a benchmark CSV; every metric must be a finite number."""
        columns = reader.fieldnames or []
        if "arch" not in columns:
            raise ValueError(f"benchmark table {source!r} has columns {columns}; expected an 'arch' column")
        metrics = [c for c in columns if c not in cls.NON_METRICS]
        rows = {}
        for row in reader:
            values = {}
            for metric in metrics:
                try:
                    values[metric] = float(row[metric])
                except (TypeError, ValueError):
                    values[metric] = math.nan
                # NaN or inf would abort a search midway or win it, so the table is refused here.
                if not math.isfinite(values[metric]):
                    raise ValueError(f"benchmark table {source!r} line {reader.line_num}, column {metric!r}: expected a finite "
                                     f"number, got {row[metric]!r}")
            rows[row["arch"]] = values
        return columns, rows

    def __len__(self) -> int:
        return len(self.rows)

    def check_metric(self, metric: str) -> str:
        """`metric` if it is a column of the table."""
        if metric not in self.metrics:
            raise ValueError(f"unknown metric column {metric!r} in {self.source}; expected one of {list(self.metrics)}")
        return metric

    def lookup(self, genotype: Any) -> dict[str, float]:
        """The metrics of one architecture."""
        arch = self.space.format(genotype)
        try:
            return self.rows[arch]
        except KeyError:
            raise ValueError(f"architecture {arch} is not in {self.source}") from None

    def best(self, metric: str) -> tuple[str, float]:
        """The architecture with the highest `metric` and its value."""
        self.check_metric(metric)
        arch = max(self.rows, key=lambda a: self.rows[a][metric])
        return arch, self.rows[arch][metric]

    def join(self, other: "TabularBenchmark") -> "TabularBenchmark":
        """Both tables' metrics per architecture (e.g. accuracies and per-device latencies)."""
        clash = set(self.metrics) & set(other.metrics)
        if clash:
            raise ValueError(f"tables {self.source} and {other.source} share metric columns {sorted(clash)}")
        missing = [a for a in self.rows if a not in other.rows]
        if missing:
            raise ValueError(f"{len(missing)} architectures of {self.source} are missing from {other.source}, "
                             f"e.g. {missing[0]}")
        rows = {a: {**m, **other.rows[a]} for a, m in self.rows.items()}
        return TabularBenchmark(rows, self.metrics + other.metrics, self.space, f"{self.source} + {other.source}")


class TabularEvaluator:
    """Answers instantly from a table; the reward is one metric column or a function of the row."""

    def __init__(self, table: TabularBenchmark, reward: Reward = "cifar10-val") -> None:
        if isinstance(reward, str):
            table.check_metric(reward)
        self.table, self.reward = table, reward

    def __call__(self, genotype: Any) -> Evaluation:
        metrics = self.table.lookup(genotype)
        return Evaluation(reward_of(self.reward, metrics), dict(metrics))


class ProxyEvaluator:
    """Scores a genotype by a zero-cost proxy at initialisation (`supernet.proxies`): no training at all.

    The reward is the proxy's score (higher = predicted better); a cell the proxy cannot score (no path
    from input to output: -inf) gets `floor`, since a reward must be finite. Metrics hold the score and
    its seconds.
    """

    def __init__(self, proxy: str, space: "str | CellSpace" = "nb201", batches: Sequence[Batch] | None = None,
                 seed: int = 0, floor: float = -1e30, **options: Any) -> None:
        from supernet import proxies

        self.proxy, self.space, self.seed = proxies.check_proxy(proxy), get_space(space), seed
        self.floor = checks.number("floor", floor)
        self.batches = list(batches) if batches is not None else proxies.digits_batches(seed=seed)
        self.options = options
        self._score = proxies.score

    def __call__(self, genotype: Any) -> Evaluation:
        start = time.perf_counter()
        value = self._score(self.proxy, genotype, self.space, self.batches, seed=self.seed, **self.options)
        seconds = time.perf_counter() - start
        reward = value if math.isfinite(value) else self.floor
        return Evaluation(reward, {self.proxy: reward, "proxy_seconds": seconds})


class SupernetEvaluator:
    """Scores a candidate with the supernet's weights: `network.subnet(genotype)`, batch-norm statistics
    re-estimated on `bn_batches` training batches (SPOS), then held-out accuracy, precision, recall,
    macro-F1, parameters and FLOPs of the path, and optionally measured latency and table metrics
    (e.g. a per-device latency table). The supernet's own batch-norm buffers are left unchanged.

    `device` (auto|cpu|cuda|cuda:N; None: where the network is) is where the network is moved and
    every batch is sent. Inside a torch.distributed process group (`supernet sample` under torchrun)
    each rank scores its share of the held-out batches and the predictions are gathered, so every
    rank gets the metrics one process would, in a fraction of the time."""

    def __init__(self, network: SearchNetwork, train_batches: Sequence[Batch], heldout_batches: Sequence[Batch],
                 bn_batches: int = 4, reward: Reward = "accuracy", measure_latency: bool = False,
                 latency_repeats: int = 5, tables: Iterable[TabularBenchmark] = (),
                 device: "str | torch.device | None" = None) -> None:
        if not isinstance(network, SearchNetwork):
            raise ValueError(f"network must be a SearchNetwork, got {type(network).__name__}")
        if not train_batches or not heldout_batches:
            raise ValueError("the supernet evaluator needs at least one training batch and one held-out batch")
        checks.integer("bn_batches", bn_batches)
        checks.integer("latency_repeats", latency_repeats)
        if device is not None:
            network = network.to(devices.resolve_device(device))
        self.device = next(network.parameters()).device
        self.network, self.train_batches, self.heldout_batches = network, list(train_batches), list(heldout_batches)
        self.bn_batches, self.reward = bn_batches, reward
        self.measure_latency, self.latency_repeats = measure_latency, latency_repeats
        self.tables = list(tables)
        for table in self.tables:
            if table.space.name != network.space.name:
                raise ValueError(f"table {table.source} is for space {table.space.name!r}; the supernet's space is "
                                 f"{network.space.name!r}")

    def __call__(self, genotype: Any) -> Evaluation:
        network = self.network
        was_training = network.training
        sub = network.subnet(genotype)
        rank, world = distributed.rank(), distributed.world_size()
        try:
            with preserved_batchnorm(network):
                recalibrate_batchnorm(sub, [devices.to_device(b, self.device) for b in self.train_batches],
                                      num_batches=self.bn_batches)
                with torch.no_grad():  # this rank's share of the held-out batches (all of them in one process)
                    mine = [(i, sub(x.to(self.device)).argmax(dim=1).cpu())
                            for i, (x, _) in enumerate(self.heldout_batches) if i % world == rank]
                if world > 1:
                    mine = sorted(p for part in distributed.all_gather_object(mine, "gathering predictions")
                                  for p in part)
                predictions = torch.cat([p for _, p in mine])
                labels = torch.cat([y for _, y in self.heldout_batches]).cpu()
                metrics = classification_metrics(predictions, labels, network.num_classes)
                sample = self.heldout_batches[0][0].to(self.device)
                metrics.update(profile(sub, sample))
                if self.measure_latency:  # rank 0's measurement, so every rank holds the same history
                    metrics["latency_ms"] = distributed.broadcast_object(
                        measure_latency(sub, sample[:1], self.latency_repeats), "sharing the latency")
        finally:
            network.train(was_training)
        for table in self.tables:
            metrics.update(table.lookup(genotype))
        reward = reward_of(self.reward, metrics)
        if not math.isfinite(reward):
            raise ValueError(f"reward of {network.space.format(genotype)} is {reward}; expected a finite number")
        return Evaluation(reward, metrics)


def load_supernet(run_dir: "str | Path", heldout: str = "val", batch_size: int | None = None,
                  data: "tuple[torch.Tensor, torch.Tensor] | None" = None,
                  device: "str | torch.device" = "cpu") -> tuple[SearchNetwork, list[Batch], list[Batch]]:
    """The trained supernet of a `supernet search` run folder, its training batches (for batch-norm
    re-estimation) and its held-out batches (`heldout`: the run's "val" or "test" split).

    `data`: the (images, labels) tensors again, for a run searched on them (`supernet search --data-file`).
    The one place that reads a run folder, through `supernet.load_run`.
    """
    from supernet import load_run
    from supernet.runs import CHECKPOINT, read_checkpoint_config

    checks.choice("heldout split", heldout, ("val", "test"))
    checks.optional_integer("batch_size", batch_size)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} does not exist")
    if not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"run folder {str(run_dir)!r} holds no {CHECKPOINT}; expected a 'supernet search' run")
    dataset = read_checkpoint_config(run_dir / CHECKPOINT).get("dataset")
    if dataset == "tensors" and data is None:
        raise ValueError(f"run {str(run_dir)!r} was searched on tensors from --data-file; pass the same --data-file")
    if dataset != "tensors" and data is not None:
        raise ValueError(f"run {str(run_dir)!r} was searched on dataset {dataset!r}, not on tensors; "
                         "leave out --data-file")
    run = load_run(run_dir, data=data, device=device)
    size = batch_size or run.config.batch_size
    return run.network, batches(*run.split.train, size), batches(*getattr(run.split, heldout), size)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[Batch]:
    """Splits tensors into (x, y) batches in order."""
    checks.integer("batch_size", batch_size)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


