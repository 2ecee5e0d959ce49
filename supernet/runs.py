"""Run-folder I/O. Every write is atomic: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: "str | Path", write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: "str | Path") -> Path:
    """torch.save that never leaves a half-written file behind."""
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: "str | Path") -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj: Any, path: "str | Path") -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)
