"""One-shot methods in the NAS-Bench-201 space: do they collapse to parameter-free cells?

Each method searches the nb201 supernet on real data available offline (the embedded digits by default,
or Omniglot's alphabets at 32x32 with `--dataset omniglot --data-dir PATH`), for several seeds; the derived
cell is looked up in the shipped 12-epoch table. Each run's cell is printed as it finishes; then, per
method: the median and mean `cifar10-test` of the derived cells, how many reach the table's 90th
percentile, and the share of parameter-free ops (pools, skip) in them.

The defaults are the papers' per-step protocol (batch 64, each method's alpha learning rate, no
warm-up) on a budget two CPU cores fit: C=8, one cell per stage, 20 epochs of the digits (11 steps each,
about 25 s a run at one thread). `--a-lr` and `--arch-warmup-epochs` set every method's alpha learning
rate and weight-only epochs (README: what they change on this budget). With CIFAR-10 at hand,
`--dataset cifar10 --data-dir DIR --C 16 --layers 5 --epochs 50` is the published NB201 search.

    python bench/nb201_collapse.py --seeds 5 --methods darts drnas beta-darts darts-minus sdarts
    python bench/nb201_collapse.py --seeds 5 --first-seed 10 --a-lr 3e-3 --arch-warmup-epochs 10
    python bench/nb201_collapse.py --seeds 5 --methods drnas --drnas-progressive
    python bench/nb201_collapse.py --seeds 5 --selection perturbation --projection-interval 2
    python bench/nb201_collapse.py --seeds 10 --selection perturbation --projection-interval 2 --projection-criterion loss

With `--selection perturbation` (DARTS-PT) each run also reports the cell that argmax would have derived
from the same search (the last search epoch's), so the two selections are compared on the same supernets.
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

from supernet.search_config import SELECTIONS
from supernet.selection import CRITERIA

METHODS = ["darts", "drnas", "beta-darts", "darts-minus", "sdarts", "gdas"]


def run_one(method: str, seed: int, options: dict) -> tuple:
    """One seeded search with the given search options; returns (method, seed, derived arch, parameter-free
    share, seconds, the arch argmax derived at the end of the search epochs)."""
    import supernet

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = supernet.search(space="nb201", method=method, seed=seed, retrain_epochs=0,
                                 run_dir=Path(tmp) / "run", **options)
    last = result.history["epochs"][-1]
    searched = result.history["epochs"][options["epochs"] - 1]["genotype"]
    return (method, seed, str(result.results["genotype"]), last.get("parameter_free_share"),
            time.perf_counter() - start, searched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 "
                        "(tune on other seeds than the reported ones)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1, help="search cells per stage (NB201: 5)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--a-lr", type=float, default=None, help="Adam's learning rate for the alphas, every "
                        "method (default: each method's paper value, 3e-4)")
    parser.add_argument("--arch-warmup-epochs", type=int, default=None,
                        help="weight-only epochs before the alphas move (default: each method's, 0)")
    parser.add_argument("--sdarts-epsilon", type=float, default=None,
                        help="sdarts: the final bound of the weight step's noise (default: SDARTS's 0.3)")
    parser.add_argument("--drnas-progressive", action="store_true",
                        help="drnas runs DrNAS's progressive search (k=4, then k=2 with 3 candidates per edge, "
                        "each stage half the epochs); --arch-warmup-epochs then counts per stage")
    parser.add_argument("--selection", default="argmax", choices=SELECTIONS,
                        help="how the cell is read off the supernet (perturbation: DARTS-PT, after the search)")
    parser.add_argument("--projection-interval", type=int, default=5,
                        help="perturbation: tuning epochs between two projected edges (DARTS-PT: 5)")
    parser.add_argument("--projection-criterion", default="accuracy", choices=CRITERIA,
                        help="perturbation: what a removal costs, the validation accuracy lost or loss gained")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    options = dict(C=args.C, layers=args.layers, epochs=args.epochs, batch_size=args.batch_size,
                   dataset=args.dataset, data_dir=args.data_dir, selection=args.selection)
    if args.selection == "perturbation":
        options["projection_interval"] = args.projection_interval
        options["projection_criterion"] = args.projection_criterion
    for name in ("a_lr", "arch_warmup_epochs", "sdarts_epsilon"):  # unset: each method's own value
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    per_method = {m: dict(options, drnas_progressive=True) if m == "drnas" and args.drnas_progressive else options
                  for m in args.methods}
    label = {m: "drnas (progressive)" if per_method[m].get("drnas_progressive") else m for m in args.methods}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    from strategies.evaluators import TabularBenchmark

    table = TabularBenchmark.load("nb201")
    tests = sorted(r["cifar10-test"] for r in table.rows.values())
    p90 = tests[int(0.9 * len(tests))]
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        # Seeds outermost, so a run cut short still has every method's first seeds.
        futures = [pool.submit(run_one, m, s, per_method[m]) for s in seeds for m in args.methods]
        for future in as_completed(futures):
            results.append(future.result())
            method, seed, arch, free, seconds, searched = results[-1]
            argmax = f"; argmax after the search: {table.rows[searched]['cifar10-test']:.2f} {searched}" \
                if searched != arch else ""
            print(f"{label[method]} seed {seed}: {table.rows[arch]['cifar10-test']:.2f} {arch} "
                  f"(parameter-free share {free:.2f}, {seconds:.0f} s{argmax})", flush=True)
    progressive = ", drnas progressive" if args.drnas_progressive else ""
    print(f"\nnb201 supernet, {options}{progressive}, seeds {seeds[0]}-{seeds[-1]}; "
          f"derived cells looked up in the 12-epoch table (cifar10-test; 90th percentile {p90:.2f}, "
          f"best {tests[-1]:.2f}); wall time {time.perf_counter() - start:.0f} s with {args.workers} workers\n")
    pt = args.selection == "perturbation"
    print("| method | median | mean | >= 90th pct | parameter-free share | s/run |"
          + (" argmax median / mean / >= 90th pct |" if pt else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---|" if pt else ""))
    for method in args.methods:
        rows = [r for r in results if r[0] == method]
        accs = [table.rows[r[2]]["cifar10-test"] for r in rows]
        free = [r[3] for r in rows if r[3] is not None]
        searched = [table.rows[r[5]]["cifar10-test"] for r in rows]
        print(f"| {label[method]} | {statistics.median(accs):.2f} | {statistics.mean(accs):.2f} | "
              f"{sum(a >= p90 for a in accs)}/{len(accs)} | {statistics.mean(free):.2f} | "
              f"{statistics.mean(r[4] for r in rows):.1f} |"
              + (f" {statistics.median(searched):.2f} / {statistics.mean(searched):.2f} / "
                 f"{sum(a >= p90 for a in searched)}/{len(searched)} |" if pt else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
