"""`supernet sample`: run strategies over a trained supernet run folder or a tabular benchmark.

Writes, in the sample folder (--out, or a new `samples/sample-<time>`): `<strategy>.json` (the
checkpoint: config and full history, resumable with --resume), `best_reward.png` (best reward against
evaluations, one line per strategy) and `summary.json` (each strategy's best trial, and the Pareto
front when a cost metric is known).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from supernet import checks, devices, distributed, runs
from supernet.cli import add_device_arguments, set_threads
from supernet.data import load_data_file
from supernet.tensorboard import check_available as check_tensorboard
from supernet.tensorboard import open_events

from .base import STRATEGIES, Strategy, make_strategy, restore, search
from .evaluators import ProxyEvaluator, SupernetEvaluator, TabularBenchmark, TabularEvaluator, load_supernet
from .metrics import TargetReward, pareto_front
from .plots import plot_best_reward

ORDER = ("random", "evolution", "reinforce", "qlearning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `supernet sample`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", metavar="CSV",
                        help="a tabular benchmark: 'nb201' (the 12-epoch NAS-Bench-201 table shipped with supernet) "
                             "or a CSV path with an 'arch' column plus one column per metric")
    source.add_argument("--run", metavar="RUN_DIR", help="a trained supernet run folder from 'supernet search'")
    source.add_argument("--proxy", metavar="NAME",
                        help="a zero-cost proxy at initialisation (synflow, snip, grad_norm, jacov, naswot, params, "
                             "flops; data proxies use the embedded digits): no training, no table")
    parser.add_argument("--data-file", type=Path, default=None,
                        help="with --run: the torch file of (images, labels) the run was searched on "
                             "('supernet search --data-file')")
    parser.add_argument("--space", default="nb201", help="search space of the benchmark table")
    parser.add_argument("--metric", default=None,
                        help="reward metric (default: cifar10-val for a benchmark, accuracy for a run)")
    parser.add_argument("--strategy", nargs="+", default=list(ORDER),
                        help=f"strategies to run, from {sorted(STRATEGIES.names())} (default: {list(ORDER)})")
    parser.add_argument("--budget", type=int, default=100, help="evaluations per strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start", metavar="PROXY", default=None,
                        help="zero-cost warm start (synflow, snip, grad_norm, jacov, naswot, params, flops) for the "
                             "strategies that take one (bananas, evolution, random): their first cells are the "
                             "proxy's best of a seeded random pool; the proxy's seconds go into summary.json, "
                             "never counted as evaluations")
    parser.add_argument("--warm-pool", type=int, default=100, help="cells in the warm start's pool")
    parser.add_argument("--out", type=Path, default=None,
                        help="sample folder, new or empty (default: a new samples/sample-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--quiet", action="store_true", help="no per-strategy lines")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard events (rewards, metrics, best so far) into OUT/tensorboard")
    parser.add_argument("--latency-table", metavar="CSV",
                        help="per-device latency table: 'nb201-latency' (shipped) or a CSV path in its format")
    parser.add_argument("--cost", default=None,
                        help="cost metric for the reward target and Pareto front (e.g. raspi4_ms, latency_ms, params)")
    parser.add_argument("--target", type=float, default=None,
                        help="cost target, a positive cost value: reward = metric * (cost / target) ** weight (MnasNet)")
    parser.add_argument("--weight", type=float, default=-0.07, help="exponent of the cost term")
    parser.add_argument("--hard", action="store_true", help="apply the cost term only above the target")
    parser.add_argument("--heldout", default="val", choices=["val", "test"],
                        help="run split that scores subnetworks")
    parser.add_argument("--bn-batches", type=int, default=4, help="training batches that re-estimate batch norm")
    parser.add_argument("--measure-latency", action="store_true", help="time each subnetwork's forward (ms)")
    add_device_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for small subnets "
                             "on busy cores)")


def build_evaluator(args: argparse.Namespace):
    """The evaluator the arguments describe, its space, and how often to checkpoint under it."""
    if args.target is not None:
        if args.cost is None:
            raise ValueError("--target needs --cost, the metric the target applies to")
        checks.number("--target (a cost value)", args.target, positive=True)
    checks.number("--weight", args.weight)
    if args.data_file is not None and not args.run:
        raise ValueError("--data-file goes with --run (the tensors that run was searched on)")
    tables = [TabularBenchmark.load(args.latency_table, args.space)] if args.latency_table else []
    if args.benchmark:
        table = TabularBenchmark.load(args.benchmark, args.space)
        for extra in tables:
            table = table.join(extra)
        metric = table.check_metric(args.metric or "cifar10-val")
        if args.cost is not None:
            table.check_metric(args.cost)
        reward = metric if args.target is None else TargetReward(metric, args.cost, args.target, args.weight, args.hard)
        return TabularEvaluator(table, reward), args.space, 50
    if args.proxy:
        if args.target is not None or args.cost is not None or tables:
            raise ValueError("--proxy scores cells by the proxy alone; --cost, --target and --latency-table "
                             "go with --benchmark or --run")
        return ProxyEvaluator(args.proxy, args.space, seed=args.seed), args.space, 1
    checks.integer("--bn-batches", args.bn_batches)
    data = load_data_file(args.data_file) if args.data_file is not None else None
    network, train, heldout = load_supernet(args.run, args.heldout, data=data,
                                            device=devices.resolve_device(getattr(args, "device", "cpu")))
    metric = args.metric or "accuracy"
    reward = metric if args.target is None else TargetReward(metric, args.cost, args.target, args.weight, args.hard)
    evaluator = SupernetEvaluator(network, train, heldout, args.bn_batches, reward, args.measure_latency,
                                  tables=tables)
    return evaluator, network.space, 1


def build_strategies(args: argparse.Namespace, space) -> dict[str, Strategy]:
    """Each named strategy: new, or (with --resume) restored from its checkpoint in --out."""
    if args.resume:
        if args.out is None or not args.out.is_dir():
            raise ValueError(f"--resume needs --out, the sample folder to continue; got {args.out}")
        if not any((args.out / f"{name}.json").is_file() for name in args.strategy):
            raise ValueError(f"cannot resume: {str(args.out)!r} holds none of "
                             f"{[f'{name}.json' for name in args.strategy]}")
    options = warm_start_options(args)
    strategies = {}
    for name in args.strategy:
        checkpoint = None if args.out is None else args.out / f"{name}.json"
        if args.resume and checkpoint.is_file():
            state = json.loads(checkpoint.read_text())
            config = state.get("config", {})
            for key, value in options.items():  # checked before the replay, which recomputes the proxy
                if config.get(key) != value:
                    raise ValueError(f"{checkpoint} was searched with {key}={config.get(key)!r}, not {value!r}; "
                                     f"resume without --warm-start/--warm-pool, or start a new sample folder")
            strategy = restore(state, space, args.budget)
            if strategy.name != name:
                raise ValueError(f"{checkpoint} holds a {strategy.name!r} search, not {name!r}")
        else:
            strategy = make_strategy(name, space, args.budget, args.seed, **options)
        strategies[name] = strategy
    return strategies


def warm_start_options(args: argparse.Namespace) -> dict:
    """The strategy options of --warm-start and --warm-pool (none without --warm-start)."""
    if args.warm_start is None:
        return {}
    from supernet.proxies import check_proxy

    check_proxy(args.warm_start)
    checks.integer("--warm-pool", args.warm_pool)
    def takes_warm_start(name: str) -> bool:
        return "warm_start" in inspect.signature(STRATEGIES.get(name)).parameters

    unable = [name for name in args.strategy if not takes_warm_start(name)]
    if unable:
        able = [name for name in STRATEGIES.names() if takes_warm_start(name)]
        raise ValueError(f"--warm-start applies to {able}, not {unable}; choose --strategy among those")
    return {"warm_start": args.warm_start, "warm_pool": args.warm_pool}


def run(args: argparse.Namespace) -> int:
    """Runs `supernet sample`: checks everything, then opens the sample folder and searches.

    Under torchrun every rank runs the same seeded strategies; a supernet's held-out scoring of each
    candidate is split across the ranks, and rank 0 alone writes the sample folder.
    """
    device = devices.resolve_device(getattr(args, "device", "auto"))
    opened = distributed.setup(device)
    try:
        return _run(args)
    finally:
        distributed.teardown(opened)


def _run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    main = distributed.is_main()
    if not main:
        args.quiet = True
    checks.integer("--budget", args.budget)
    check_tensorboard(args.tensorboard)
    evaluator, space, checkpoint_every = build_evaluator(args)
    strategies = build_strategies(args, space)
    # Every check is done: only now is the sample folder made (no junk folder from a bad option).
    if args.resume:
        out = args.out
    else:  # rank 0 makes the folder; the others only learn its path
        out = distributed.on_main(lambda: runs.open_run_dir(args.out, "samples", "sample"), "sharing the sample folder")
    if not args.quiet:
        print(f"sample folder: {out}")
    try:
        for name, strategy in strategies.items():
            search(strategy, evaluator, out / f"{name}.json" if main else None, checkpoint_every)
            if not args.quiet:
                best = strategy.best()
                print(f"{name}: best reward {best.reward:.4f} after {len(strategy.history)} evaluations: {best.arch}")
                if getattr(strategy, "warm", None) is not None:
                    print(f"{name}: zero-cost warm start ({strategy.warm.proxy}, pool of {strategy.warm.pool}): "
                          f"{strategy.warm.seconds:.1f} s, not counted as evaluations")
    except KeyboardInterrupt:
        print(f"\nsupernet sample: interrupted; continue with the same options and --resume --out {out}",
              file=sys.stderr)
        return 130
    if not main:
        return 0
    events = open_events(out, args.tensorboard)
    for name, strategy in strategies.items():
        events.trials(name, strategy.history)
    plot_best_reward(strategies, out / "best_reward.png")
    events.image_file("best_reward", out / "best_reward.png")
    events.close()
    summary = {"best": {name: vars(s.best()) for name, s in strategies.items()}}
    warm = {name: s.warm for name, s in strategies.items() if getattr(s, "warm", None) is not None}
    if warm:  # the proxy's cost: reported, never an evaluation
        summary["warm_start"] = {name: {"proxy": w.proxy, "pool": w.pool, "seconds": w.seconds}
                                 for name, w in warm.items()}
    if args.cost is not None:
        trials = [t for s in strategies.values() for t in s.history]
        summary["pareto_front"] = [vars(t) for t in pareto_front(trials, {"reward": "max", args.cost: "min"})]
    runs.atomic_write_json(summary, out / "summary.json")
    if not args.quiet:
        print(f"wrote {out}/<strategy>.json, best_reward.png and summary.json")
    return 0
