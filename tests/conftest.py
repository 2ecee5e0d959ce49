import os
from pathlib import Path

import pytest
import torch

# Test shapes are tiny: one intra-op thread is faster than two, and far faster when the cores are
# shared (spinning OpenMP threads made a 0.1 s forward take 20 s under load). The CLI commands
# tested in-process set their own thread counts, so every test starts from one again.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run in its interpreter; the flag must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (NAS-Bench-201 tables, Omniglot) that `.ci/run` points SUPERNET_DATA at."""
    root = os.environ.get("SUPERNET_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("needs the real data folder: set SUPERNET_DATA (the .ci/run script sets it)")
    return Path(root)


@pytest.fixture
def nan_fill(monkeypatch):
    """Fills every buffer the kernel launchers allocate with NaN, so an element a kernel skips fails."""
    monkeypatch.setattr("kernels._alloc.FILL", float("nan"))


@pytest.fixture(params=["triton", "torch"])
def implementation(request, monkeypatch):
    """Runs a test once with each implementation of the kernels' custom ops: "triton" (on the CPU, Triton's
    interpreter through the wrapper the GPU runs) and "torch" (the CPU's own code)."""
    monkeypatch.setattr("kernels.backend.TRITON_ON_CPU", request.param == "triton")
    return request.param


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Runs the Triton kernels for CPU tensors (in Triton's interpreter) through their custom ops and wrappers."""
    monkeypatch.setattr("kernels.backend.TRITON_ON_CPU", True)
