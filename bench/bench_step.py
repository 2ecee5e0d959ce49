"""End-to-end: one search step (forward + backward to weights and alphas) of SearchNetwork, fused=False
against fused=True, for each space and mixing rule.

    python bench/bench_step.py [--device cpu|cuda] [--quick] [--paper]

Default sizes are the small CPU config of shared/notes/cpu-measurements.md (C=8, 5 layers,
batch 32, 16x16 for darts; C=8, N=1, batch 32, 16x16 for nb201); --paper uses C=16, 8 layers,
batch 64, 32x32. On a GPU, torch.compile of the fused network is a third provider.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import append_csv, pick_device, print_rows, row, time_interleaved  # noqa: E402
from supernet import SearchNetwork  # noqa: E402

MIXINGS = {"darts": ["softmax", "gumbel", "partial"], "nb201": ["softmax", "gumbel"]}


def run(device: str, spaces=("darts", "nb201"), paper: bool = False, quick: bool = False, runs: int = 10,
        with_compile: bool = True) -> list[dict]:
    rows = []
    c, layers, batch, side = (16, 8, 64, 32) if paper else (8, 5, 32, 16)
    for space in spaces:
        for mixing in MIXINGS[space][:1] if quick else MIXINGS[space]:
            torch.manual_seed(0)
            ref = SearchNetwork(space, C=c, layers=layers if space == "darts" else 1, num_classes=10,
                                in_channels=3, mixing=mixing, fused=False).to(device)
            fused = copy.deepcopy(ref)
            fused.fused = True
            x = torch.randn(batch, 3, side, side, device=device)
            y = torch.randint(0, 10, (batch,), device=device)

            provs = {"reference": _step(ref, x, y), "fused": _step(fused, x, y)}
            if device == "cuda" and with_compile:
                provs["torch.compile(fused)"] = _step(fused, x, y, torch.compile(fused))
            case = f"{space},{mixing},C={c},L={layers},{batch}x{side}x{side}"
            # the same seed before every provider's call: Gumbel and path draws coincide
            timings = time_interleaved(provs, device, runs=runs, before=torch.manual_seed)
            for name, fn in provs.items():
                torch.manual_seed(0)
                rows.append(row("search_step", case, "full", name, timings[name], device, fn))
    return rows


def _step(net: SearchNetwork, x: torch.Tensor, y: torch.Tensor, forward=None):
    """One forward + backward to every parameter (weights and alphas)."""
    params = list(net.parameters())

    def step():
        loss = torch.nn.functional.cross_entropy((forward or net)(x), y)
        torch.autograd.grad(loss, params, allow_unused=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="softmax mixing only")
    parser.add_argument("--paper", action="store_true", help="the DARTS paper's search config")
    parser.add_argument("--space", choices=["darts", "nb201"], action="append")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per provider")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = run(device, tuple(args.space or ("darts", "nb201")), args.paper, args.quick, args.runs)
    append_csv(rows)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
