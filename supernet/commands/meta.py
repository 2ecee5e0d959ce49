"""`supernet meta`: meta-learn architecture and weights across few-shot tasks, and compare with two baselines."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..cli import add_device_arguments, set_threads
from ..meta.learner import METHODS
from ..meta.run import DATASETS, MetaConfig

HELP = {
    "method": f"meta-learning method: {', '.join(METHODS)} (maml = second order)",
    "dataset": f"one of {', '.join(DATASETS)} (digits is embedded; omniglot needs --data-dir)",
    "data_dir": "omniglot: a zip or a folder holding images_background*.zip",
    "image_size": "omniglot images are resized to this many pixels a side",
    "split_fractions": "shares of class groups for meta-train, meta-validation and meta-test",
    "split_seed": "seed of the class split",
    "space": "search space of the SearchNetwork",
    "C": "initial channels of the SearchNetwork",
    "layers": "cells per stage (nb201) or cells in all (darts)",
    "n_way": "classes per episode",
    "k_shot": "support examples per class",
    "query": "query examples per class in meta-training episodes",
    "test_query": "query examples per class in meta-validation and meta-test episodes",
    "meta_steps": "outer updates per trained learner",
    "meta_batch": "tasks per outer update",
    "inner_steps": "adaptation steps during meta-training",
    "test_inner_steps": "adaptation steps at meta-validation and meta-test time",
    "inner_lr_weights": "inner-loop learning rate of the weights",
    "inner_lr_alphas": "inner-loop learning rate of the architecture parameters",
    "meta_lr_weights": "outer learning rate of the weights (Adam; reptile: interpolation rate); "
                       "none given: 3e-3, reptile 0.5",
    "meta_lr_alphas": "outer learning rate of the alphas (Adam; reptile: interpolation rate); none given: "
                      "as the weights'",
    "val_every": "meta-steps between meta-validations",
    "val_episodes": "episodes per meta-validation",
    "test_episodes": "meta-test episodes per learner",
    "checkpoint_every": "meta-steps between checkpoints (0: only when a learner finishes)",
    "seed": "seed of the initialisation and the episodes",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MetaConfig()
    for f in fields(MetaConfig):
        if not f.init:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "rotations":
            parser.add_argument("--no-rotations", dest="rotations", action="store_false", default=argparse.SUPPRESS,
                                help="no rotated copies as extra classes")
        elif f.name == "baselines":
            parser.add_argument("--no-baselines", dest="baselines", action="store_false", default=argparse.SUPPRESS,
                                help="meta-train and test only the meta-learned architecture + weights")
        elif f.name == "split_fractions":
            parser.add_argument(flag, type=float, nargs=3, default=argparse.SUPPRESS, metavar=("TRAIN", "VAL", "TEST"),
                                help=f"{HELP[f.name]} (default: {' '.join(map(str, default))})")
        else:
            kind = str if f.name in ("method", "dataset", "data_dir", "space") else \
                float if f.name.startswith("meta_lr") else type(default)
            shown = "" if f.name.startswith("meta_lr") else f" (default: {default})"  # theirs depends on --method
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=HELP[f.name] + shown)
    parser.add_argument("--out", default="runs", help="folder for the run folder")
    parser.add_argument("--run-dir", default=None, help="the run folder itself, new or empty (default: a new "
                        "folder under --out)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard events into RUN_DIR/tensorboard (the tensorboard extra)")
    add_device_arguments(parser)
    # One thread: each op here is a few microseconds of work, so a second thread only adds
    # synchronisation, and on a busy machine waiting for it costs up to 30x (measured on 2 cores).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def run(args: argparse.Namespace) -> int:

    from ..meta.run import RunInterrupted, describe, meta_learn

    set_threads(args.threads)
    names = [f.name for f in fields(MetaConfig) if f.init]
    options = {n: getattr(args, n) for n in names if hasattr(args, n)}  # only what was given (resume checks it)
    if "split_fractions" in options:
        options["split_fractions"] = tuple(options["split_fractions"])
    try:
        result = meta_learn(resume=args.resume, out=args.out, run_dir=args.run_dir, quiet=args.quiet,
                            tensorboard=args.tensorboard, device=args.device, **options)
    except RunInterrupted as stop:
        print(f"\nsupernet meta: interrupted; continue with: supernet meta --resume {stop.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nsupernet meta: interrupted before a run folder was made", file=sys.stderr)
        return 130
    print(describe(result))
    print(f"run folder: {result.run_dir} (curves: {result.paths['curves'].name}, results: "
          f"{result.paths['results'].name})")
    return 0
