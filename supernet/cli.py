"""`supernet` command line: one subcommand per job, each implemented in its own module.

Each module exposes `add_arguments(parser)` and `run(args) -> int`. The `sample` command lives
with the strategies; this entry point is the one place `supernet` reaches into `strategies`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "search": ("supernet.commands.search", "one-shot architecture search on a dataset, then retrain and compare"),
    "sample": ("strategies.command", "sample subnetworks with a strategy from a trained supernet or a tabular benchmark"),
    "meta": ("supernet.commands.meta", "meta-learn architecture and weights across few-shot tasks (MetaNAS-style)"),
    "export": ("supernet.commands.export", "write a search run's model as a torch.export program (or ONNX)"),
}


def set_threads(threads: int | None) -> None:
    """Applies a command's `--threads` option (None keeps torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device`, shared by the commands that run networks (the run owns the device)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (a GPU when there is one), cpu, cuda or cuda:N; under torchrun auto and cuda "
                             "take the LOCAL_RANK-th GPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supernet", description="Fast one-shot neural architecture search.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except ValueError as err:  # bad input: one clear line, no stack trace
        print(f"supernet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
