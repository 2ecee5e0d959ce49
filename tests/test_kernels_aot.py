"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (ptxas runs), without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels import mixed_sum, pool_candidates  # noqa: E402
from kernels.aot import all_specs, spec_name  # noqa: E402

CAPABILITIES = (80, 90)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{(spec name, capability): result}, compiled in a fresh process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.aot", *map(str, CAPABILITIES)], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, f"kernels.aot printed nothing; stderr:\n{run.stderr[-3000:]}"
    return {(r["name"], r["capability"]): r for r in results}


def test_every_kernel_has_a_spec():
    # a kernel added without an ahead-of-time spec would escape the compile check
    kernels = {name for module in (mixed_sum, pool_candidates) for name in dir(module)
               if name.startswith("_") and name.endswith("_kernel")}
    assert kernels == {fn.__name__ for fn, _, _ in all_specs()}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", [spec_name(spec) for spec in all_specs()])
def test_kernel_compiles_for_gpu(compiled, name, capability):
    result = compiled[(name, capability)]
    assert result["ok"], result.get("error")
    assert result["ptx_target"].startswith(f"sm_{capability}"), result["ptx_target"]
    assert result["cubin_bytes"] > 0
