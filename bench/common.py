"""Shared benchmark plumbing: timing quantiles, peak memory, kernel launches per call, CSV rows."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)
RESULTS = Path(__file__).resolve().parent / "results.csv"
FIELDS = ["timestamp", "device", "torch", "triton", "supernet", "bench", "case", "mode", "provider",
          "ms_p50", "ms_p20", "ms_p80", "gb_per_s", "peak_mib", "launches"]


def device_name(device: str) -> str:
    """A readable device name for the CSV."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import supernet

    return {"torch": torch.__version__, "triton": triton_version, "supernet": supernet.__version__}


def time_quantiles(fn: Callable[[], object], device: str, warmup: int = 3, min_runs: int = 10,
                   budget_s: float = 1.0) -> tuple[float, float, float]:
    """Milliseconds at QUANTILES: triton.testing.do_bench on CUDA, repeated wall-clock runs on the CPU."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=list(QUANTILES), warmup=25, rep=100))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor(QUANTILES, dtype=torch.float64).float())
    return tuple(float(v) for v in q)


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1, device: str = "cpu",
                before: Callable[[int], object] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU milliseconds of each timed call per provider, the providers in turn (ABAB...), so
    that load from other processes on a shared machine falls on all of them alike. `before(i)` runs untimed
    before each call of run i (e.g. to seed the same random path for every provider). On a shared machine the
    CPU time (all threads of this process) is the steadier figure: it leaves out time spent preempted."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            if before is not None:
                before(i)
            if device == "cuda":
                torch.cuda.synchronize()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, runs: int = 10, warmup: int = 2,
                     before: Callable[[int], object] | None = None) -> dict[str, tuple[float, float, float]]:
    """Wall milliseconds at QUANTILES per provider, timed by `interleaved`."""
    wall, _ = interleaved(fns, runs, warmup, device, before)
    q = torch.tensor(QUANTILES)
    return {name: tuple(float(v) for v in torch.tensor(t).quantile(q)) for name, t in wall.items()}


def row(bench: str, case: str, mode: str, provider: str, quantiles: tuple[float, float, float], device: str,
        fn: Callable[[], object] | None = None, bytes_moved: int | None = None) -> dict:
    """A CSV row from measured quantiles (peak memory and launches measured on `fn` when given)."""
    p50, p20, p80 = quantiles
    peak = peak_memory_mib(fn, device) if fn is not None else None
    return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), **versions(), "bench": bench, "case": case, "mode": mode,
            "provider": provider, "ms_p50": round(p50, 4), "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
            "gb_per_s": round(bytes_moved / p50 / 1e6, 2) if bytes_moved else "",
            "peak_mib": "" if peak is None else round(peak, 2),
            "launches": launches_per_call(fn, device) if fn is not None else ""}


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call allocates beyond what was live before it (CUDA only; None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def launches_per_call(fn: Callable[[], object], device: str) -> int:
    """GPU kernels launched (CUDA), or ATen operators dispatched (CPU), by one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    # outermost operators only: a composite or custom op's internals are not separate dispatches
    def is_op(e) -> bool:
        return e.name.startswith(("aten::", "supernet::"))

    def outermost(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if is_op(parent):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in events if is_op(e) and outermost(e))


def measure(bench: str, case: str, mode: str, provider: str, fn: Callable[[], object], device: str,
            bytes_moved: int | None = None, **timing) -> dict:
    """One CSV row: time quantiles, GB/s from the minimum bytes that must move, peak memory, launches."""
    return row(bench, case, mode, provider, time_quantiles(fn, device, **timing), device, fn, bytes_moved)


def append_csv(rows: list[dict], path: Path = RESULTS) -> None:
    """Appends rows to the results CSV (header written once)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_rows(rows: list[dict]) -> None:
    """A compact table of the rows on stdout."""
    cols = ["bench", "case", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "gb_per_s", "peak_mib", "launches"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def pick_device(requested: str | None) -> str:
    """cuda when available (or asked for), else cpu."""
    if requested:
        if requested == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
        return requested
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def kernel_bench_main(description: str, run: Callable[..., list[dict]], cpu_cases: list, gpu_cases: list,
                      argv: list[str] | None = None) -> int:
    """The command line the per-kernel scripts share: pick a device, run its cases, append and print the rows."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="first case only")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cases = cpu_cases if device == "cpu" else gpu_cases
    rows = run(device, cases[:1] if args.quick else cases)
    append_csv(rows)
    print_rows(rows)
    return 0
