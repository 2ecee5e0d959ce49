"""NAS-Bench-201 comparison of strategies on the 12-epoch table.

Each strategy searches on `cifar10-val` with budgets of 50, 100 and 300 evaluations over many seeds; the
chosen cell (highest `cifar10-val` in the history) is reported by its `cifar10-test` accuracy and its
regret against the best `cifar10-test` cell of the table (mean and standard deviation over seeds), with
the mean wall time of one search (s/run) and, at the end, the wall time of the whole comparison.

    python bench/nb201_strategies.py --seeds 100 --workers 1   # the shipped table; --data CSV for another
    python bench/nb201_strategies.py --strategies bananas --first-seed 1000   # seeds kept apart for tuning
    python bench/nb201_strategies.py --strategies bananas --first-seed 1000 --options '{"local_search": 5}'
"""

from __future__ import annotations

import argparse
import os

# One BLAS thread per process (set before numpy loads): the bananas MLPs are tiny, and --workers
# decides the parallelism.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402

from strategies import list_strategies, make_strategy, search  # noqa: E402
from strategies.evaluators import TabularBenchmark, TabularEvaluator  # noqa: E402
from supernet import checks  # noqa: E402

ORDER = ["random", "evolution", "reinforce", "qlearning", "bananas"]
_TABLE: dict[str, TabularBenchmark] = {}


def _table(path: str) -> TabularBenchmark:
    if path not in _TABLE:
        _TABLE[path] = TabularBenchmark.load(path, "nb201")
    return _TABLE[path]


def run_one(path: str, name: str, budget: int, seed: int, search_metric: str, report_metric: str,
            options: dict) -> tuple:
    """One seeded search with strategy `options`; returns (chosen arch, its report metric, seconds)."""
    torch.set_num_threads(1)  # the REINFORCE controller is tiny: threads only add overhead
    table = _table(path)
    start = time.perf_counter()
    strategy = search(make_strategy(name, "nb201", budget, seed, **options), TabularEvaluator(table, search_metric))
    chosen = strategy.best()
    return chosen.arch, table.rows[chosen.arch][report_metric], time.perf_counter() - start


def compare(args: argparse.Namespace) -> None:
    """Prints the comparison table the arguments describe."""
    checks.integer("--seeds", args.seeds, minimum=2)  # a standard deviation needs two seeds
    checks.integer("--workers", args.workers)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options must be a JSON object, got {args.options!r} ({err})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    for name in args.strategies:
        make_strategy(name, "nb201", 1, 0, **options)  # a bad option fails here, before any search
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    wall = time.perf_counter()
    for budget in args.budgets:
        checks.integer("--budgets", budget)
    table = _table(args.data)
    table.check_metric(args.search_metric)
    table.check_metric(args.report_metric)
    best_arch, best_value = table.best(args.report_metric)
    val_arch, _ = table.best(args.search_metric)
    print(f"table: {args.data} ({len(table)} cells); search on {args.search_metric}, report {args.report_metric}; "
          f"seeds {seeds.start}-{seeds.stop - 1}, {args.workers} worker(s)" + (f"; options {options}" if options else ""))
    print(f"best {args.report_metric} in the table: {best_value:.2f}; the best-{args.search_metric} cell scores "
          f"{table.rows[val_arch][args.report_metric]:.2f}")
    print()
    print(f"| strategy | budget | seeds | {args.report_metric} (mean ± std) | regret (mean ± std) | found best | s/run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with ProcessPoolExecutor(args.workers) as pool:
        for name in args.strategies:
            for budget in args.budgets:
                jobs = [pool.submit(run_one, args.data, name, budget, seed, args.search_metric, args.report_metric,
                                    options) for seed in seeds]
                results = [j.result() for j in jobs]
                values = [v for _, v, _ in results]
                regrets = [best_value - v for v in values]
                found = sum(arch == val_arch for arch, _, _ in results)
                seconds = statistics.mean(s for _, _, s in results)
                print(f"| {name} | {budget} | {args.seeds} | {statistics.mean(values):.2f} ± "
                      f"{statistics.stdev(values):.2f} | {statistics.mean(regrets):.2f} ± {statistics.stdev(regrets):.2f} "
                      f"| {found}/{args.seeds} | {seconds:.3f} |", flush=True)
    print(f"\nwall time: {time.perf_counter() - wall:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nb201", help="the 12-epoch table: 'nb201' (shipped) or a CSV path")
    parser.add_argument("--seeds", type=int, default=100, help="searches per strategy and budget")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run from here (tune on seeds apart from the reported 0-99, e.g. 1000)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 300])
    parser.add_argument("--strategies", nargs="+", default=ORDER, choices=list_strategies())
    parser.add_argument("--search-metric", default="cifar10-val")
    parser.add_argument("--report-metric", default="cifar10-test")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--options", default="{}",
                        help="strategy options as a JSON object, given to every strategy (e.g. for tuning bananas)")
    try:
        compare(parser.parse_args(argv))
    except ValueError as err:  # bad input: one clear line, no stack trace
        print(f"nb201_strategies: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
