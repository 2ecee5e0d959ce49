"""Issue 10's targets: one search step (forward, backward, SGD update) against the DARTS-layout baseline.

    PYTHONPATH=. python3 bench/bench_search_step.py [--paper] [--batch B] [--threads N] [--runs R] [--levers]
                                                    [--others] [--saved-only]

Providers, timed interleaved in one process (ABAB...), ratios against `darts_ref` (tests/darts_reference.py:
DARTS's model_search.Network op for op, NCHW, every candidate run separately, `none` included, stepped by
torch.optim.SGD as DARTS's train_search.py does; ours are stepped by the search loop's `weight_optimizer`):
  today:    SearchNetwork(fused=True) with the batched cell off (the per-edge path);
  batched:  SearchNetwork(fused=True) with supernet/batched_cell.py (the design);
  --levers: batched with one lever off at a time (no_channels_last, no_share_pools, ...).
Saved bytes: every tensor autograd saves for backward during the forward, each storage once
(torch.autograd.graph.saved_tensors_hooks), a count, not a timing.
--others: PC-DARTS (partial), GDAS (gumbel) and nb201 (softmax, gumbel), today vs batched.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved  # noqa: E402
from supernet import SearchNetwork, batched_cell  # noqa: E402
from supernet.compat.darts import from_darts  # noqa: E402
from supernet.search_loop import weight_optimizer  # noqa: E402
from tests.darts_reference import Network  # noqa: E402

SMALL = (8, 5, 32, 16)
PAPER = (16, 8, 64, 32)


def saved_bytes(forward) -> int:
    """Bytes autograd holds for backward after forward(), each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def make_step(net, params, x, y, enabled: bool | None = None, levers: dict | None = None, ours: bool = True):
    """One step's closure and its forward. `ours`: the weights' optimizer the search loop builds
    (`weight_optimizer`: fused SGD); else DARTS's plain torch.optim.SGD, with the same settings."""
    settings = SimpleNamespace(w_lr=0.025, w_momentum=0.9, w_weight_decay=3e-4)
    opt = (weight_optimizer(params, settings) if ours else
           torch.optim.SGD(params, lr=settings.w_lr, momentum=settings.w_momentum, weight_decay=settings.w_weight_decay))

    def setup():
        if enabled is not None:
            batched_cell.ENABLED = enabled
        for k in batched_cell.LEVERS:
            batched_cell.LEVERS[k] = True if levers is None else levers.get(k, True)

    def forward():
        setup()
        return torch.nn.functional.cross_entropy(net(x), y)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, forward


def darts_cases(cfg, levers: bool):
    c, layers, batch, side = cfg
    torch.manual_seed(0)
    ref = Network(c, 10, layers)
    ref.alphas_normal.requires_grad_(True)
    ref.alphas_reduce.requires_grad_(True)
    net = from_darts(ref.state_dict(), ref.alphas_normal.detach(), ref.alphas_reduce.detach())
    net.fused = True
    ref.train()
    net.train()
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    provs = {"darts_ref": make_step(ref, list(ref.parameters()), x, y, enabled=False, ours=False)}
    today = copy.deepcopy(net)
    provs["today"] = make_step(today, today.weight_parameters(), x, y, enabled=False)
    provs["batched"] = make_step(net, net.weight_parameters(), x, y, enabled=True)
    if levers:
        for lever in batched_cell.LEVERS:
            m = copy.deepcopy(net)
            provs[f"no_{lever}"] = make_step(m, m.weight_parameters(), x, y, enabled=True, levers={lever: False})
    return provs


def other_cases(cfg):
    c, layers, batch, side = cfg
    cases = {}
    for space, mixing in (("darts", "partial"), ("darts", "gumbel"), ("nb201", "softmax"), ("nb201", "gumbel")):
        torch.manual_seed(0)
        net = SearchNetwork(space, C=c, layers=layers if space == "darts" else 1, num_classes=10, mixing=mixing)
        net.train()
        x = torch.randn(batch, 3, side, side)
        y = torch.randint(0, 10, (batch,))
        other = copy.deepcopy(net)
        cases[f"{space},{mixing}"] = {"today": make_step(other, other.weight_parameters(), x, y, enabled=False),
                                      "batched": make_step(net, net.weight_parameters(), x, y, enabled=True)}
    return cases


def report(label: str, provs: dict, runs: int, base: str, saved: bool = True) -> None:
    times, cpu = interleaved({k: v[0] for k, v in provs.items()}, runs, before=torch.manual_seed)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"== {label}  threads={torch.get_num_threads()} runs={runs}")
    for k in provs:
        line = (f"  {k:18s} wall med {med[k]:8.1f} ms min {min(times[k]):8.1f}  cpu med {cmed[k]:8.1f}"
                f" | /{base}: wall med {med[k] / med[base]:.3f} min {min(times[k]) / min(times[base]):.3f}"
                f" cpu med {cmed[k] / cmed[base]:.3f}")
        if saved:
            torch.manual_seed(0)  # the same Gumbel / path draws for every provider
            b = saved_bytes(provs[k][1])
            if k == base:
                base_bytes = b
            line += f" | saved {b / 2**20:7.1f} MiB, /{base} {b / base_bytes:.3f}"
        print(line, flush=True)
    # per-run paired ratios against the baseline: robust to load drifting over the runs
    for k in provs:
        if k != base:
            ratios = [a / b for a, b in zip(times[k], times[base])]
            print(f"  paired {k}/{base}: median {statistics.median(ratios):.3f} range {min(ratios):.3f}-{max(ratios):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--levers", action="store_true")
    p.add_argument("--others", action="store_true")
    p.add_argument("--batch", type=int, default=None,
                   help="another batch size (e.g. 2: what is left when the arithmetic is 16x smaller is per-call cost)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = PAPER if a.paper else SMALL
    if a.batch is not None:
        cfg = (cfg[0], cfg[1], a.batch, cfg[3])
    if a.others:
        for label, provs in other_cases(cfg).items():
            report(f"{label} C,L,B,HW={cfg}", provs, a.runs, "today")
    else:
        report(f"darts,softmax C,L,B,HW={cfg}", darts_cases(cfg, a.levers), a.runs, "darts_ref")
    batched_cell.ENABLED = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
