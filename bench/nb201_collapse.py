"""One-shot methods in the NAS-Bench-201 space: do they collapse to parameter-free cells?

Each method searches the nb201 supernet on real data available offline (the embedded digits by default,
or Omniglot's alphabets at 32x32 with `--dataset omniglot --data-dir PATH`), for several seeds; the derived
cell is looked up in the shipped 12-epoch table. Each run's cell is printed as it finishes; then, per
method: the median and mean `cifar10-test` of the derived cells, how many reach the table's 90th
percentile, and the share of parameter-free ops (pools, skip) in them. `--dataset cifar10 --data-dir DIR`
searches on CIFAR-10.

    python bench/nb201_collapse.py --seeds 5 --epochs 15 --dataset omniglot --data-dir ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

METHODS = ["darts", "drnas", "beta-darts", "darts-minus", "gdas"]


def run_one(method: str, seed: int, epochs: int, C: int, layers: int, dataset: str, data_dir: str | None) -> tuple:
    """One seeded search; returns (method, seed, derived arch, parameter-free share, seconds)."""
    import supernet

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = supernet.search(space="nb201", method=method, C=C, layers=layers, epochs=epochs, seed=seed,
                                 dataset=dataset, data_dir=data_dir, retrain_epochs=0, run_dir=Path(tmp) / "run")
    last = result.history["epochs"][-1]
    return method, seed, str(result.results["genotype"]), last.get("parameter_free_share"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1, help="search cells per stage (NB201: 5)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from strategies.evaluators import TabularBenchmark

    table = TabularBenchmark.load("nb201")
    tests = sorted(r["cifar10-test"] for r in table.rows.values())
    p90 = tests[int(0.9 * len(tests))]
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        # Seeds outermost, so a run cut short still has every method's first seeds.
        futures = [pool.submit(run_one, m, s, args.epochs, args.C, args.layers, args.dataset, args.data_dir)
                   for s in range(args.seeds) for m in args.methods]
        for future in as_completed(futures):
            results.append(future.result())
            method, seed, arch, free, seconds = results[-1]
            print(f"{method} seed {seed}: {table.rows[arch]['cifar10-test']:.2f} {arch} "
                  f"(parameter-free share {free:.2f}, {seconds:.0f} s)", flush=True)
    print(f"\nnb201 supernet C={args.C}, N={args.layers}, {args.epochs} epochs on {args.dataset}, seeds 0-{args.seeds - 1}; "
          f"derived cells looked up in the 12-epoch table (cifar10-test; 90th percentile {p90:.2f}, "
          f"best {tests[-1]:.2f}); wall time {time.perf_counter() - start:.0f} s with {args.workers} workers\n")
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
