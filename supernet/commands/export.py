"""`supernet export`: a search run's model as a `torch.export` program (or ONNX) that runs without supernet."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import load_data_file
from ..export import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished 'supernet search' run folder")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="file to write (load it with torch.export.load(FILE).module())")
    parser.add_argument("--subnet", action="store_true",
                        help="export the supernet's chosen path with inherited weights, not the retrained network")
    parser.add_argument("--onnx", action="store_true", help="write ONNX instead (needs the onnx extra)")
    parser.add_argument("--data-file", type=Path, default=None,
                        help="with --subnet: the (images, labels) file a run searched with --data-file used")


def run(args: argparse.Namespace) -> int:
    data = load_data_file(args.data_file) if args.data_file is not None else None
    path = export(args.run_dir, args.out, subnet=args.subnet, onnx=args.onnx, data=data)
    print(f"wrote {path}")
    return 0
