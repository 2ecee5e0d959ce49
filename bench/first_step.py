"""Issue 10's "no long start": seconds from process start to the end of the first search step, in a fresh process.

    python3 bench/first_step.py [--paper] [--provider batched|darts_ref] [--threads N]

Prints the time to import torch and the rest, to build the network and its step, and the first three steps
(the first one pays oneDNN's primitive creation and the allocator's first touches); nothing is compiled.
Run it once per provider: a process measures only its first step once.
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

TORCH = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_search_step import PAPER, SMALL, make_step  # noqa: E402
from supernet import SearchNetwork  # noqa: E402
from tests.darts_reference import Network  # noqa: E402

IMPORTS = time.perf_counter()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true", help="the paper's search config (C=16, 8 cells, batch 64, 32x32)")
    p.add_argument("--provider", choices=["batched", "darts_ref"], default="batched")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    c, layers, batch, side = PAPER if a.paper else SMALL
    torch.manual_seed(0)
    if a.provider == "batched":
        net = SearchNetwork("darts", C=c, layers=layers, num_classes=10).train()
        step, _ = make_step(net, net.weight_parameters(), torch.randn(batch, 3, side, side),
                            torch.randint(0, 10, (batch,)), enabled=True)
    else:
        net = Network(c, 10, layers).train()
        step, _ = make_step(net, list(net.parameters()), torch.randn(batch, 3, side, side),
                            torch.randint(0, 10, (batch,)), enabled=False, ours=False)
    built = time.perf_counter()
    ends = []
    for _ in range(3):
        step()
        ends.append(time.perf_counter())
    steps = [b - a for a, b in zip([built, *ends], ends)]
    print(f"{a.provider}, {'paper' if a.paper else 'small'} config, {a.threads} thread(s): import torch "
          f"{TORCH - START:.2f} s, the rest {IMPORTS - TORCH:.2f} s, build {built - IMPORTS:.2f} s, steps "
          f"{steps[0]:.2f} / {steps[1]:.2f} / {steps[2]:.2f} s; end of the first step {ends[0] - START:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
