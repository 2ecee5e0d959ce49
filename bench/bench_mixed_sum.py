"""Microbenchmark of mixed_sum: providers reference | torch.compile | triton on a GPU, reference | fused on the CPU.

    python bench/bench_mixed_sum.py [--device cpu|cuda] [--quick]

GB/s counts the minimum bytes that must move: forward reads K candidates and writes the output;
backward reads the output gradient and the K candidates (for the weight gradients) and writes K
candidate gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import kernel_bench_main, measure  # noqa: E402
from kernels.mixed_sum import mixed_sum_reference  # noqa: E402
from supernet import dispatch  # noqa: E402

# (candidates K, elements per candidate N): a DARTS node at the small CPU config (2 edges x 7 ops,
# batch 32, 8 channels, 16x16), the paper config (batch 64, 16 channels, 32x32), and GPU working sets
# of 288 MiB and 960 MiB (fp32) for the bandwidth target.
CPU_CASES = [(14, 32 * 8 * 16 * 16), (14, 64 * 16 * 32 * 32)]
GPU_CASES = [(14, 64 * 16 * 32 * 32), (8, 8 * 2**20), (14, 16 * 2**20)]


def providers(device: str) -> dict:
    def fused(outs, w):
        return dispatch.mixed_sum(outs, w, fused=True)

    if device == "cpu":
        return {"reference": mixed_sum_reference, "fused": fused}
    return {"reference": mixed_sum_reference, "torch.compile": torch.compile(mixed_sum_reference), "triton": fused}


def run(device: str, cases, modes=("forward", "backward", "full"), dtype=torch.float32) -> list[dict]:
    return [row for k, n in cases for row in _case(device, k, n, modes, dtype)]


def _case(device: str, k: int, n: int, modes, dtype) -> list[dict]:
    rows = []
    size = torch.tensor([], dtype=dtype).element_size()
    outputs = [torch.randn(n, device=device, dtype=dtype, requires_grad=True) for _ in range(k)]
    weights = torch.softmax(torch.randn(k, device=device), 0).requires_grad_()
    grad = torch.randn(n, device=device, dtype=dtype)
    case = f"K={k},N={n},{str(dtype).removeprefix('torch.')}"
    moved = {"forward": (k + 1) * n * size, "backward": (2 * k + 1) * n * size}
    moved["full"] = moved["forward"] + moved["backward"]
    for name, fn in providers(device).items():
        out = fn(outputs, weights)
        calls = {
            "forward": lambda fn=fn: fn(outputs, weights),
            "backward": lambda out=out: torch.autograd.grad(out, [*outputs, weights], grad, retain_graph=True),
            "full": lambda fn=fn: torch.autograd.grad(fn(outputs, weights), [*outputs, weights], grad),
        }
        for mode in modes:
            rows.append(measure("mixed_sum", case, mode, name, calls[mode], device, moved[mode]))
    return rows


def main(argv=None) -> int:
    return kernel_bench_main(__doc__.splitlines()[0], run, CPU_CASES, GPU_CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
