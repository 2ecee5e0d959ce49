import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (NAS-Bench-201 tables, Omniglot) that `.ci/run` points SUPERNET_DATA at."""
    root = os.environ.get("SUPERNET_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("needs the real data folder: set SUPERNET_DATA (the .ci/run script sets it)")
    return Path(root)
