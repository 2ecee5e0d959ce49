"""`supernet search`: a one-shot search, then the derived and a random architecture retrained and compared.

With no options this is the main job: first-order DARTS in the DARTS space on the embedded digits,
a few minutes on 2 CPU cores. Every option is a field of `supernet.SearchConfig`, so the
command and `supernet.search(...)` take the same settings.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from ..cli import add_device_arguments, set_threads
from ..data import load_data_file
from ..devices import PRECISIONS
from ..distributed import PeerFailure
from ..search_config import DATASETS, METHODS, SELECTIONS, SearchConfig
from ..search_loop import DivergenceError
from ..search_run import search
from ..selection import CRITERIA
from ..spaces import list_spaces

HELP = {
    "method": "search method: " + "; ".join(f"{k}: {m.summary}" for k, m in METHODS.items()),
    "space": "cell search space",
    "dataset": "digits: scikit-learn's 8x8 digits, embedded; cifar10: read from --data-dir; omniglot: the "
               "alphabet of each handwritten character, 32x32, from the zips at --data-dir (nothing is downloaded)",
    "data_dir": "cifar10: the folder holding its python layout ('cifar-10-batches-py'); omniglot: a zip or a "
                "folder of zips (images_background*.zip)",
    "max_train": "use at most this many non-test examples",
    "val_fraction": "share of the non-test data the architecture is fitted on (DARTS: 0.5)",
    "test_fraction": "share held out for test accuracies (when the dataset has no test set)",
    "augment": "random crops (4-pixel padding) and flips of the training batches, true or false (default: true "
               "for cifar10 only, as DARTS and NAS-Bench-201 search)",
    "seed": "seed of the data split, initialisation, batch order and sampling",
    "C": "initial channels of the search network",
    "layers": "cells of the search network (reductions at 1/3 and 2/3)",
    "epochs": "search epochs",
    "batch_size": "global search batch size (training and validation batches); under torchrun each of the W "
                  "ranks takes batch_size / W of it",
    "micro_batches": "cut each batch into this many parts with their own batch-norm statistics, gradients "
                     "averaged (a W-rank run cuts it into W; --micro-batches W reproduces one in one process)",
    "precision": "fp32, or autocast in bf16 or fp16 (with a gradient scaler); alphas stay fp32",
    "steps_per_epoch": "cap on steps per epoch (default: one pass over the training split)",
    "w_lr": "weight learning rate (SGD, momentum, cosine schedule)",
    "w_lr_min": "final weight learning rate of the cosine schedule",
    "w_momentum": "SGD momentum for the weights",
    "w_weight_decay": "weight decay for the weights (default: the method's paper value)",
    "grad_clip": "gradient-norm clip for the weights",
    "a_lr": "Adam learning rate for the architecture parameters (default: the method's paper value)",
    "a_weight_decay": "weight decay for the architecture parameters",
    "arch_warmup_epochs": "weight-only epochs before alphas move (default: 30%% for pc-darts, else 0; with "
                          "--drnas-progressive per stage, 20%% of it)",
    "unrolled_xi": "darts-2nd virtual step size (default: the current weight learning rate)",
    "partial_k": "pc-darts: candidates see 1/k of the channels",
    "tau_max": "gdas: Gumbel-softmax temperature at the first epoch",
    "tau_min": "gdas: temperature at the last epoch (linear annealing)",
    "spos_candidates": "spos: random subnets ranked on the validation split to choose the result",
    "reg_scale": "drnas: weight of a KL term toward a Dirichlet(1) prior that replaces the alphas' weight decay "
                 "(0, the default: weight decay --a-weight-decay, as DrNAS's default)",
    "beta_lambda": "beta-darts: the beta-decay regulariser's weight is beta_lambda * epoch / epochs "
                   "(beta-DARTS's NB201 code: 50)",
    "sdarts_epsilon": "sdarts: the weight step's noise bound U(-eps, eps) on softmax(alpha) grows linearly from "
                      "0.03 at the first epoch toward this (SDARTS's code: 0.3)",
    "drnas_progressive": "drnas, nb201: DrNAS's progressive search: the first half of the epochs on 1/4 of the "
                         "channels, the second on 1/2 with each edge pruned to its 3 strongest candidates; "
                         "--arch-warmup-epochs then counts per stage (default: 20%% of a stage, DrNAS's 10 of 50)",
    "selection": "how the architecture is read off the supernet: argmax (the space's rule on the alphas) or "
                 "perturbation (DARTS-PT: after the search, each edge in turn is fixed to the candidate whose "
                 "removal costs the supernet the most validation accuracy, then in the darts space each node keeps "
                 "the two inputs whose removal costs the most; --projection-interval tuning epochs between two "
                 "projections)",
    "projection_interval": "selection perturbation: tuning epochs between two projections (DARTS-PT: 5)",
    "projection_criterion": "selection perturbation: what removing a candidate costs the supernet, the validation "
                            "accuracy lost (DARTS-PT's default) or the validation loss gained",
    "hessian_every": "every N epochs, record the dominant eigenvalue of the validation-loss Hessian w.r.t. the "
                     "alphas (power iteration on one validation batch; 0: never)",
    "checkpoint_every": "also checkpoint every N steps inside an epoch (0: at epoch ends only)",
    "retrain_epochs": "epochs to retrain the derived and a random architecture from scratch (0: skip)",
    "retrain_C": "initial channels of the retrained networks",
    "retrain_layers": "cells of the retrained networks",
    "retrain_lr": "retraining learning rate (SGD, cosine schedule)",
    "retrain_momentum": "retraining SGD momentum",
    "retrain_nesterov": "retraining uses Nesterov momentum (true or false)",
    "retrain_weight_decay": "retraining weight decay",
    "retrain_grad_clip": "retraining gradient-norm clip",
    "retrain_batch_size": "retraining batch size",
}
CHOICES = {"method": list(METHODS), "space": list_spaces(), "dataset": list(DATASETS), "precision": list(PRECISIONS),
           "selection": list(SELECTIONS), "projection_criterion": list(CRITERIA)}


def _boolean(text: str) -> bool:
    """'true'/'false' (also yes/no, 1/0) as a bool, for boolean options."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


OPTIONAL_TYPES = {"data_dir": str, "data_fingerprint": str, "max_train": int, "steps_per_epoch": int,
                  "w_weight_decay": float, "a_lr": float, "arch_warmup_epochs": int, "unrolled_xi": float,
                  "augment": _boolean}


class _Explicit(argparse.Action):
    """Stores the value and remembers that the user gave it (a resumed run may only repeat its options)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace._explicit = getattr(namespace, "_explicit", set()) | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one option per SearchConfig field, plus the run-folder options."""
    for f in fields(SearchConfig):
        if f.name == "data_fingerprint":  # set from --data-file, never by hand
            continue
        default = f.default if f.default is not MISSING else None
        kind = OPTIONAL_TYPES.get(f.name, _boolean if isinstance(default, bool) else type(default))
        # a switch that is off by default also works bare: --drnas-progressive means --drnas-progressive true
        bare = dict(nargs="?", const=True) if default is False else {}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default,
                            choices=CHOICES.get(f.name), action=_Explicit, help=HELP[f.name],
                            metavar=None if f.name in CHOICES else f.name.upper(), **bare)
    parser.add_argument("--data-file", type=Path, default=None,
                        help="search on your own tensors: a torch file holding (images (N,C,H,W) float, labels (N,) long)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder under which the run folder is created")
    parser.add_argument("--run-dir", type=Path, default=None, help="exact run folder to write (default: a new one in --out)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run from its checkpoint (options given must match the run)")
    add_device_arguments(parser)
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard events into RUN_DIR/tensorboard (the tensorboard extra)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the search step (opt-in; the first step's time, compilation included, "
                             "goes into results.json and the log)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no summary")


def run(args: argparse.Namespace) -> int:
    """Runs `supernet search` from parsed options."""
    set_threads(args.threads)
    names = [f.name for f in fields(SearchConfig) if f.name != "data_fingerprint"]
    explicit = getattr(args, "_explicit", set())
    if args.data_file is not None and "dataset" in explicit and args.dataset != "tensors":
        raise ValueError(f"--dataset {args.dataset} and --data-file both name the data; give only one")
    data = load_data_file(args.data_file) if args.data_file is not None else None
    if args.resume is not None:
        options = {n: getattr(args, n) for n in names if n in explicit}
    else:
        options = {n: getattr(args, n) for n in names}
        if data is not None:
            options["dataset"] = "tensors"
        elif options["dataset"] == "tensors":
            raise ValueError("--dataset tensors needs --data-file")
    opened: list[Path] = []  # the run folder, once made: an interruption names it even under --quiet
    try:
        result = search(resume=args.resume, data=data, run_dir=args.run_dir, out=args.out, quiet=args.quiet,
                        on_run_dir=opened.append, device=args.device, compile=args.compile,
                        tensorboard=args.tensorboard, **options)
    except (DivergenceError, PeerFailure) as err:
        print(f"supernet search: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if opened:
            print(f"\nsupernet search: interrupted; continue with: supernet search --resume {opened[0]}",
                  file=sys.stderr)
        else:
            print("\nsupernet search: interrupted before the run folder was made; nothing to resume", file=sys.stderr)
        return 130
    if not args.quiet and "search" in result.results:  # rank 0 (or one process) prints the summary
        r = result.results
        print(f"genotype: {r['genotype']}")
        print(f"search: {r['search']['seconds']:.1f} s, final validation accuracy of the supernet "
              f"{r['search']['final_val_accuracy']:.4f}")
        if "derived" in r:
            budget = f"{r['config']['retrain_epochs']} epochs"
            print(f"test accuracy, retrained from scratch for {budget}: derived {r['derived']['test_accuracy']:.4f}, "
                  f"random {r['random']['test_accuracy']:.4f}")
        print(f"total: {r['total_seconds']:.1f} s; results: {result.paths['results']}")
    return 0
