"""The batched cell's fixed CPU shape rules (supernet/cpu_convs.py, batched_cell.py), each alternative timed.

    PYTHONPATH=. python3 bench/bench_cpu_rules.py [--threads N] [--reps R]

Forward + backward (or the one gradient a rule chooses), median of R calls after a warm-up, fp32,
channels_last inputs. Prints ms per provider and each provider's ratio to oneDNN's own call ("aten"):
  strided dilated depthwise (stride 2, dilation 2): aten vs `subsampled` (a stride-1 conv of every other pixel);
  depthwise weight gradient (stride 1): aten vs `split` (3x3 pieces) vs `as_conv` (the gradient as kernel);
  1x1 conv: aten vs `mm` (one matmul) vs `pairs` (two pixels a row against a block-diagonal weight);
  one conv candidate on 4 edges leaving a state: `separate` chains vs one `stacked` chain (ratios to separate).
The rule comments in batched_cell.py quote these figures; rerun it where the CPU differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from supernet import batched_cell as bc  # noqa: E402
from supernet import cpu_convs as cc  # noqa: E402
from supernet.ops import OPS  # noqa: E402

CL = torch.channels_last
SHAPES = [(32, 8, 16, 16), (32, 16, 8, 8), (32, 32, 4, 4), (64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def report(label: str, providers: dict, reps: int, base: str = "aten") -> None:
    ms = {name: median_ms(fn, reps) for name, fn in providers.items()}
    print(f"{label:34s} " + "  ".join(f"{k} {v:7.3f} ms ({v / ms[base]:.2f})" for k, v in ms.items()), flush=True)


def strided_dilated(shape, k: int, reps: int) -> None:
    c, p = shape[1], k - 1
    x = torch.randn(*shape).contiguous(memory_format=CL).requires_grad_()
    conv = torch.nn.Conv2d(c, c, k, stride=2, padding=p, dilation=2, groups=c, bias=False)

    def run(fn):
        return lambda: fn().sum().backward()

    report(f"dil_conv s2 d2 {shape} k{k}", {"aten": run(lambda: conv(x)),
                                            "subsampled": run(lambda: bc._layer(conv, x))}, reps)


def weight_gradient(shape, k: int, dilation: int, reps: int) -> None:
    x = torch.randn(*shape).contiguous(memory_format=CL)
    g = torch.randn(*shape).contiguous(memory_format=CL)
    w = torch.zeros(shape[1], 1, k, k)
    providers = {"aten": lambda: cc.aten_grads(g, x, w, 1, dilation * (k // 2), dilation, [False, True, False]),
                 "as_conv": lambda: cc.grad_weight_as_conv(x, g, k, dilation)}
    if dilation == 1 or (shape[2] % 2 == 0 and shape[3] % 2 == 0):
        providers["split"] = lambda: cc.grad_weight_split(x, g, k, dilation)
    chosen = ("as_conv" if cc.gradient_as_kernel(k, 1, dilation, shape) else
              "split" if cc.split_weight_grad(k, 1, dilation, shape) else "aten")
    report(f"dw weight grad {shape} k{k} d{dilation} [{chosen}]", providers, reps)


def pointwise(shape, reps: int) -> None:
    c = shape[1]
    x = torch.randn(*shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(c, c, 1, 1, requires_grad=True)

    def run(fn):
        return lambda: fn().sum().backward()

    providers = {"aten": run(lambda: F.conv2d(x, w)), "mm": run(lambda: cc.pointwise_mm(x, w, 1)),
                 "pairs": run(lambda: cc.pointwise_mm(x, w, 2))}
    report(f"1x1 {shape} [{cc.pointwise_pixels_per_row(*shape)} px/row]", providers, reps)


def stacked_edges(shape, name: str, edges: int, reps: int) -> None:
    """One candidate on `edges` edges leaving one state, forward + backward: each edge's chain in turn
    ("separate") vs one chain over the edges stacked along channels ("stacked")."""
    n, c, h, w = shape
    x = torch.randn(n, c, h, w).contiguous(memory_format=CL).requires_grad_()
    chains = [bc._chain(OPS.get(name)(c, 1, False)) for _ in range(edges)]
    weights = torch.rand(edges, requires_grad=True)

    def separate():
        r = torch.relu(x)
        total = 0
        for (layers, bn), scale in zip(chains, bc.channel_scales(weights, c).unbind(0)):  # as the cell does
            y = r
            for kind, layer in layers:
                y = bc._run(kind, layer, y)
            total = total + bc.weighted_batch_norm(y, bn, scale).sum()
        total.backward()

    def stacked():
        bc._stacked_chains(chains, torch.relu(x), weights).sum().backward()

    rule = "stacked" if n * c * h * w <= bc.STACK_MAX_ELEMENTS else "separate"
    report(f"{name} x{edges} {shape} [{rule}]", {"separate": separate, "stacked": stacked}, reps, "separate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for shape in SHAPES:
        for k in (3, 5):
            strided_dilated((shape[0], shape[1], 2 * shape[2], 2 * shape[3]), k, a.reps)
    for shape in SHAPES:
        for k, dilation in ((5, 1), (3, 2), (5, 2)):
            weight_gradient(shape, k, dilation, a.reps)
    for shape in SHAPES:
        pointwise(shape, a.reps)
    for shape in SHAPES:
        for name in ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"):
            stacked_edges(shape, name, 4, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
