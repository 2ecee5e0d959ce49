"""One-shot methods in the NAS-Bench-201 space: do they collapse to parameter-free cells?

Each method searches the nb201 supernet on real data available offline (the embedded digits by default),
for several seeds; the derived cell is looked up in the shipped 12-epoch table. Reported per method: the
median and mean `cifar10-test` of the derived cells, how many reach the table's 90th percentile, and the
share of parameter-free ops (pools, skip) in them. `--dataset cifar10 --data-dir DIR` searches on CIFAR-10.

    python bench/nb201_collapse.py --seeds 5 --epochs 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

METHODS = ["darts", "drnas", "beta-darts", "darts-minus", "gdas"]


def run_one(method: str, seed: int, epochs: int, C: int, dataset: str, data_dir: str | None) -> tuple:
    """One seeded search; returns (method, seed, derived arch, parameter-free share, seconds)."""
    import supernet

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = supernet.search(space="nb201", method=method, C=C, layers=1, epochs=epochs, seed=seed,
                                 dataset=dataset, data_dir=data_dir, retrain_epochs=0, run_dir=Path(tmp) / "run")
    last = result.history["epochs"][-1]
    return method, seed, str(result.results["genotype"]), last.get("parameter_free_share"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from strategies.evaluators import TabularBenchmark

    table = TabularBenchmark.load("nb201")
    tests = sorted(r["cifar10-test"] for r in table.rows.values())
    p90 = tests[int(0.9 * len(tests))]
    jobs = [(m, s) for m in args.methods for s in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, *zip(*[(m, s, args.epochs, args.C, args.dataset, args.data_dir)
                                                for m, s in jobs])))
    print(f"nb201 supernet C={args.C}, N=1, {args.epochs} epochs on {args.dataset}, seeds 0-{args.seeds - 1}; "
          f"derived cells looked up in the 12-epoch table (cifar10-test; 90th percentile {p90:.2f}, "
          f"best {tests[-1]:.2f})\n")
    print("| method | median | mean | >= 90th pct | parameter-free share | s/run |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        rows = [r for r in results if r[0] == method]
        accs = [table.rows[r[2]]["cifar10-test"] for r in rows]
        free = [r[3] for r in rows if r[3] is not None]
        print(f"| {method} | {statistics.median(accs):.2f} | {statistics.mean(accs):.2f} | "
              f"{sum(a >= p90 for a in accs)}/{len(accs)} | {statistics.mean(free):.2f} | "
              f"{statistics.mean(r[4] for r in rows):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
