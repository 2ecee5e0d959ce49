"""`supernet sample`: run strategies over a trained supernet run folder or a tabular benchmark.

Writes, under --out: `<strategy>.json` (the checkpoint: config and full history, resumable with
--resume), `best_reward.png` (best reward against evaluations, one line per strategy) and
`summary.json` (each strategy's best trial, and the Pareto front when a cost metric is known).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from supernet.cli import set_threads
from supernet.runs import atomic_write_json

from .base import Strategy, make_strategy, restore, search
from .evaluators import SupernetEvaluator, TabularBenchmark, TabularEvaluator, load_supernet
from .metrics import TargetReward, pareto_front
from .plots import plot_best_reward

ORDER = ("random", "evolution", "reinforce", "qlearning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", metavar="CSV",
                        help="a tabular benchmark: 'arch' column plus one column per metric (nb201_12epoch.csv)")
    source.add_argument("--run", metavar="RUN_DIR", help="a trained supernet run folder from 'supernet search'")
    parser.add_argument("--space", default="nb201", help="search space of the benchmark table")
    parser.add_argument("--metric", default=None,
                        help="reward metric (default: cifar10-val for a benchmark, accuracy for a run)")
    parser.add_argument("--strategy", nargs="+", default=list(ORDER), help=f"strategies to run, from {list(ORDER)}")
    parser.add_argument("--budget", type=int, default=100, help="evaluations per strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--latency-table", metavar="CSV", help="per-device latency table (nb201_latency.csv format)")
    parser.add_argument("--cost", default=None,
                        help="cost metric for the reward target and Pareto front (e.g. raspi4_ms, latency_ms, params)")
    parser.add_argument("--target", type=float, default=None,
                        help="cost target: reward = metric * (cost / target) ** weight (MnasNet)")
    parser.add_argument("--weight", type=float, default=-0.07, help="exponent of the cost term")
    parser.add_argument("--hard", action="store_true", help="apply the cost term only above the target")
    parser.add_argument("--heldout", default="val", choices=["val", "test"],
                        help="run split that scores subnetworks")
    parser.add_argument("--bn-batches", type=int, default=4, help="training batches that re-estimate batch norm")
    parser.add_argument("--measure-latency", action="store_true", help="time each subnetwork's forward (ms)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for small subnets "
                             "on busy cores)")


def build_evaluator(args: argparse.Namespace):
    """The evaluator the arguments describe, and how often to checkpoint under it."""
    tables = [TabularBenchmark.load(args.latency_table, args.space)] if args.latency_table else []
    if args.target is not None and args.cost is None:
        raise ValueError("--target needs --cost, the metric the target applies to")
    if args.benchmark:
        table = TabularBenchmark.load(args.benchmark, args.space)
        for extra in tables:
            table = table.join(extra)
        metric = table.check_metric(args.metric or "cifar10-val")
        if args.cost is not None:
            table.check_metric(args.cost)
        reward = TargetReward(metric, args.cost, args.target, args.weight, args.hard) if args.target else metric
        return TabularEvaluator(table, reward), args.space, 50
    network, train, heldout = load_supernet(args.run, args.heldout)
    metric = args.metric or "accuracy"
    reward = TargetReward(metric, args.cost, args.target, args.weight, args.hard) if args.target else metric
    evaluator = SupernetEvaluator(network, train, heldout, args.bn_batches, reward, args.measure_latency,
                                  tables=tables)
    return evaluator, network.space, 1


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    evaluator, space, checkpoint_every = build_evaluator(args)
    out = Path(args.out)
    results: dict[str, Strategy] = {}
    for name in args.strategy:
        checkpoint = out / f"{name}.json"
        if args.resume and checkpoint.is_file():
            strategy = restore(checkpoint, space, args.budget)
            if strategy.name != name:
                raise ValueError(f"{checkpoint} holds a {strategy.name!r} search, not {name!r}")
        else:
            strategy = make_strategy(name, space, args.budget, args.seed)
        search(strategy, evaluator, checkpoint, checkpoint_every)
        results[name] = strategy
        best = strategy.best()
        print(f"{name}: best reward {best.reward:.4f} after {len(strategy.history)} evaluations: {best.arch}")
    plot_best_reward(results, out / "best_reward.png")
    summary = {"best": {name: vars(s.best()) for name, s in results.items()}}
    if args.cost is not None:
        trials = [t for s in results.values() for t in s.history]
        summary["pareto_front"] = [vars(t) for t in pareto_front(trials, {"reward": "max", args.cost: "min"})]
    atomic_write_json(summary, out / "summary.json")
    print(f"wrote {out}/<strategy>.json, best_reward.png and summary.json")
    return 0
