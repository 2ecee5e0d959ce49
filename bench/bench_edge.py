"""Microbenchmark of one edge's candidates (every DARTS op but `none`, or the NB201 ops), forward+backward:
each candidate on its own (reference) against the fused path (both pools from one pass, one shared ReLU).

    python bench/bench_edge.py [--device cpu|cuda] [--quick]

On a GPU torch.compile of the reference is a third provider.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import append_csv, measure, pick_device, print_rows  # noqa: E402
from supernet import dispatch, get_space  # noqa: E402
from supernet.ops import build_op  # noqa: E402

# (space, batch, channels, side, stride): DARTS at the small CPU config and the paper config, NB201 at its config.
CPU_CASES = [("darts", 32, 8, 16, 1), ("darts", 32, 16, 16, 2), ("darts", 64, 16, 32, 1), ("nb201", 64, 16, 32, 1)]
GPU_CASES = [("darts", 64, 16, 32, 1), ("darts", 64, 32, 16, 2), ("nb201", 64, 16, 32, 1)]


def run(device: str, cases, channels_last: bool = False) -> list[dict]:
    rows = []
    for space_name, n, c, side, stride in cases:
        space = get_space(space_name)
        names = [op for op in space.ops if op != "none"]
        ops = nn.ModuleDict({name: build_op(name, c, stride, affine=False, pool_batchnorm=space.pool_batchnorm)
                             for name in names}).to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(n, c, side, side, device=device).to(memory_format=memory_format).requires_grad_()
        case = f"{space_name},{n}x{c}x{side}x{side},s{stride}" + (",cl" if channels_last else "")

        def step(fused: bool, ops=ops, x=x, names=names):
            outs = dispatch.edge_outputs(ops, x, names, fused)
            torch.autograd.grad(sum(o.sum() for o in outs), [x, *ops.parameters()])

        provs = {"reference": lambda: step(False), "fused": lambda: step(True)}
        if device == "cuda":
            provs["torch.compile"] = _compiled_edge(ops, x, names)
        for name, fn in provs.items():
            rows.append(measure("edge", case, "full", name, fn, device))
    return rows


def _compiled_edge(ops: nn.ModuleDict, x: torch.Tensor, names: list[str]):
    """torch.compile of the reference edge (on a copy of the ops), forward+backward."""
    twins = copy.deepcopy(ops)
    compiled = torch.compile(lambda inp: dispatch.edge_outputs(twins, inp, names, False))
    return lambda: torch.autograd.grad(sum(o.sum() for o in compiled(x)), [x, *twins.parameters()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="first case only")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cases = CPU_CASES if device == "cpu" else GPU_CASES
    rows = run(device, cases[:1] if args.quick else cases, args.channels_last)
    append_csv(rows)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
