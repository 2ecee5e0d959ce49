"""One command for a machine with a CUDA GPU: kernel tests compiled (not interpreted), the microbenchmarks,
the end-to-end search-step benchmark, and one summary table. Meant to finish within 8 minutes.

    python bench/gpu_check.py            # everything; without a GPU, only the CPU-safe parts run
    python bench/gpu_check.py --skip-tests

Without a GPU it runs the CPU-safe parts (interpreted kernel tests, ahead-of-time compiles, CPU
benchmarks in quick mode) and says clearly that the GPU checks were skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_kernels_mixed_sum.py", "tests/test_kernels_pool.py", "tests/test_kernels_edge.py",
                "tests/test_kernels_network.py", "tests/test_kernels_aot.py"]
# Published HBM bandwidth (GB/s) by device-name fragment; the measured copy bandwidth is shown next to it.
HBM_GB_S = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10": 600}
TARGET_FRACTION = 0.85
TARGET_MIN_BYTES = 256 * 2**20
BUDGET_S = 330  # start no benchmark stage after this: the whole run must end within 8 minutes


def run_tests(gpu: bool) -> tuple[str, str]:
    env = dict(os.environ)
    if gpu:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    else:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    status = "PASS" if proc.returncode == 0 else "FAIL"
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return status, f"{tail} ({time.time() - t0:.0f} s, {'compiled on the GPU' if gpu else 'interpreted'})"


def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy of 1 GiB: the practical bandwidth ceiling (reads + writes)."""
    import torch
    import triton.testing

    x = torch.empty(2**28, device="cuda")
    ms = triton.testing.do_bench(lambda: x.clone(), warmup=10, rep=50)
    return 2 * x.numel() * 4 / ms / 1e6


def gpu_network_checks() -> list[tuple[str, str, str]]:
    """fused=True against the reference on CUDA in fp32, and autocast fp16/bf16 running finite."""
    import copy

    import torch

    from supernet import SearchNetwork

    results = []
    for space, mixing in (("darts", "softmax"), ("darts", "gumbel"), ("nb201", "softmax"), ("darts", "partial")):
        torch.manual_seed(0)
        ref = SearchNetwork(space, C=8, layers=3 if space == "darts" else 1, num_classes=10, mixing=mixing,
                            fused=False).cuda()
        fused = copy.deepcopy(ref)
        fused.fused = True
        x = torch.randn(8, 3, 16, 16, device="cuda")
        outs = []
        for net in (ref, fused):
            torch.manual_seed(1)
            out = net(x)
            out.square().mean().backward()
            outs.append(out)
        err = (outs[0] - outs[1]).abs().max().item()
        alpha_err = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.arch_parameters(),
                                                                               fused.arch_parameters()))
        ok = err < 1e-4 and alpha_err < 1e-4
        results.append((f"fused == reference ({space}, {mixing}, fp32)", "PASS" if ok else "FAIL",
                        f"max |logit diff| {err:.2e}, max |alpha grad diff| {alpha_err:.2e}"))
        for dtype in (torch.float16, torch.bfloat16):
            fused.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                torch.manual_seed(1)
                out = fused(x)
            out.float().square().mean().backward()
            finite = bool(torch.isfinite(out).all()) and all(torch.isfinite(p.grad).all() for p in fused.parameters()
                                                             if p.grad is not None)
            rel = ((out.float() - outs[0]).norm() / outs[0].norm()).item()
            results.append((f"autocast {str(dtype).removeprefix('torch.')} ({space}, {mixing})",
                            "PASS" if finite and rel < 0.1 else "FAIL", f"finite={finite}, rel. logit error {rel:.2e}"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    started = time.time()
    summary: list[tuple[str, str, str]] = []
    if not gpu:
        print("gpu_check: no CUDA device (or TRITON_INTERPRET=1): running the CPU-safe parts only; "
              "the GPU checks (compiled kernels, bandwidth target, GPU benchmarks) are SKIPPED.", flush=True)
    if not args.skip_tests:
        summary.append(("kernel tests", *run_tests(gpu)))

    from bench import bench_edge, bench_mixed_sum, bench_pool, bench_step
    from bench.common import append_csv, print_rows

    device = "cuda" if gpu else "cpu"
    rows = []
    if gpu:
        summary.extend(gpu_network_checks())
        # cheapest first; each later stage runs only while the 8-minute budget allows (compiles are slow)
        stages = [("mixed_sum", lambda: bench_mixed_sum.run(device, bench_mixed_sum.GPU_CASES)),
                  ("pool", lambda: bench_pool.run(device, bench_pool.GPU_CASES[:2])),
                  ("step nb201", lambda: bench_step.run(device, spaces=("nb201",), quick=True, runs=10)),
                  ("step darts", lambda: bench_step.run(device, spaces=("darts",), quick=True, runs=10,
                                                        with_compile=False)),
                  ("edge", lambda: bench_edge.run(device, bench_edge.GPU_CASES))]
        for name, stage in stages:
            if time.time() - started > BUDGET_S:
                summary.append((f"benchmark {name}", "SKIPPED", f"past the {BUDGET_S} s budget"))
                continue
            rows += stage()
    else:
        rows += bench_mixed_sum.run(device, bench_mixed_sum.CPU_CASES[:1], modes=("full",))
        rows += bench_edge.run(device, bench_edge.CPU_CASES[:1])
    append_csv(rows)
    print_rows(rows)

    if gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in HBM_GB_S.items() if k in name), None)
        copy_bw = copy_bandwidth_gb_s()
        ceiling = peak or copy_bw
        for r in rows:
            if r["bench"] != "mixed_sum" or r["provider"] != "triton" or r["mode"] != "forward":
                continue
            k, n = (int(part.split("=")[1]) for part in r["case"].split(",")[:2])
            if (k + 1) * n * 4 < TARGET_MIN_BYTES:
                continue
            fraction = float(r["gb_per_s"]) / ceiling
            summary.append((f"mixed_sum bandwidth {r['case']}", "PASS" if fraction >= TARGET_FRACTION else "FAIL",
                            f"{r['gb_per_s']} GB/s = {fraction:.0%} of {ceiling:.0f} GB/s "
                            f"({'published' if peak else 'measured copy'}; copy reached {copy_bw:.0f} GB/s)"))
        for case in sorted({r["case"] for r in rows if r["bench"] in ("search_step", "edge")}):
            by = {r["provider"]: float(r["ms_p50"]) for r in rows if r["case"] == case}
            best = min(by, key=by.get)
            summary.append((f"fastest on {case}", best, ", ".join(f"{p} {ms:.2f} ms" for p, ms in by.items())))
    else:
        summary.append(("GPU checks", "SKIPPED", "no CUDA device: run this script on a GPU machine"))

    print(f"\n=== gpu_check summary ({time.time() - started:.0f} s) ===")
    width = max(len(s[0]) for s in summary)
    for what, status, detail in summary:
        print(f"{what.ljust(width)}  {status:8s}  {detail}")
    return 1 if any(status == "FAIL" for _, status, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
