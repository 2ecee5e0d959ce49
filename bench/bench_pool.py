"""Microbenchmark of the parameter-free candidates of an edge (3x3 avg and max pools, with or without the
batch norm DARTS puts after them): reference (two PyTorch pools) against the fused kernel.

    python bench/bench_pool.py [--device cpu|cuda] [--quick]

Providers: reference | torch.compile | triton on a GPU, reference | fused on the CPU. "fused"/"triton" is
the kernel's wrapper (`kernels.pool_candidates.pool_candidates`): on the CPU its op runs PyTorch's two pools,
which is why the fused edge calls those pools directly there. With the training-mode batch norms:
reference+bn (two pools, two nn.BatchNorm2d) | fused+bn (the statistics wrapper, then only the normalisation;
Triton on a GPU, PyTorch's pools and var_mean on the CPU: the measurement behind POOL_BN_FUSION).
GB/s counts reading x once and writing both pooled outputs (forward), and reading x and both gradients,
writing dL/dx (backward), for all providers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import kernel_bench_main, measure  # noqa: E402
from kernels import pool_candidates as kernel  # noqa: E402
from kernels.pool_candidates import pool_candidates_reference  # noqa: E402
from supernet.batch_norm import batch_norm_with_stats  # noqa: E402

# (batch, channels, side, stride): DARTS search at the small CPU config and the paper config.
CPU_CASES = [(32, 8, 16, 1), (32, 8, 16, 2), (64, 16, 32, 1)]
GPU_CASES = [(64, 16, 32, 1), (64, 16, 32, 2), (256, 64, 32, 1)]


def run(device: str, cases, modes=("forward", "backward", "full")) -> list[dict]:
    rows = []
    provs = {"reference": pool_candidates_reference, "fused" if device == "cpu" else "triton": kernel.pool_candidates}
    if device == "cuda":
        provs["torch.compile"] = torch.compile(pool_candidates_reference)
    provs["reference+bn"] = _with_batch_norm(device, lambda x, stride, bns: tuple(
        bn(y) for bn, y in zip(bns, pool_candidates_reference(x, stride))))
    provs["fused+bn"] = _with_batch_norm(device, _fused_batch_norm)
    for n, c, side, stride in cases:
        rows += _case(device, provs, n, c, side, stride, modes)
    return rows


def _with_batch_norm(device, pools_and_norms):
    """A provider (x, stride) -> normalised (avg, max), with its own pair of non-affine batch norms per channel count."""
    bns = {}

    def call(x, stride):
        c = x.shape[1]
        if c not in bns:
            bns[c] = [nn.BatchNorm2d(c, affine=False).to(device) for _ in range(2)]
        return pools_and_norms(x, stride, bns[c])
    return call


def _fused_batch_norm(x, stride, bns):
    avg, mx, mean, var = kernel.pool_stats(x, stride)
    return tuple(batch_norm_with_stats(y, mean[k], var[k], bn) for k, (y, bn) in enumerate(zip((avg, mx), bns)))


def _case(device, provs, n, c, side, stride, modes) -> list[dict]:
    rows = []
    x = torch.randn(n, c, side, side, device=device, requires_grad=True)
    out_elems = n * c * ((side - 1) // stride + 1) ** 2
    moved = {"forward": (x.numel() + 2 * out_elems) * 4, "backward": (2 * x.numel() + 2 * out_elems) * 4}
    moved["full"] = moved["forward"] + moved["backward"]
    case = f"{n}x{c}x{side}x{side},s{stride}"
    for name, fn in provs.items():
        avg, mx = fn(x, stride)
        grads = (torch.randn_like(avg), torch.randn_like(mx))
        calls = {"forward": lambda fn=fn: fn(x, stride),
                 "backward": lambda o=(avg, mx), g=grads: torch.autograd.grad(o, x, g, retain_graph=True),
                 "full": lambda fn=fn, g=grads: torch.autograd.grad(fn(x, stride), x, g)}
        for mode in modes:
            rows.append(measure("pool_candidates", case, mode, name, calls[mode], device, moved[mode]))
    return rows


def main(argv=None) -> int:
    return kernel_bench_main(__doc__.splitlines()[0], run, CPU_CASES, GPU_CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
