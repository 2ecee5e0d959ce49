"""Run-folder I/O. Every write is atomic: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _file_mode() -> int:
    """What the user's umask gives a new file (mkstemp alone would leave 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: "str | Path", write) -> Path:
    """Writes through `write(file)` to a temporary file beside `path`, then renames it into place.

    An OSError (a folder that cannot be written, a full disk) becomes a ValueError naming the file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise ValueError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(text: str, path: "str | Path") -> Path:
    """`text` as UTF-8, written whole."""
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(data: bytes, path: "str | Path") -> Path:
    """`data`, written whole."""
    return _atomic(path, lambda f: f.write(data))


def atomic_save_figure(fig: Any, path: "str | Path", dpi: int) -> Path:
    """A matplotlib figure as PNG, written whole (never a half-written image)."""
    return _atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def atomic_write_json(obj: Any, path: "str | Path") -> Path:
    """`obj` as indented JSON with sorted keys, written whole."""
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


# --- checkpoints ------------------------------------------------------------------------------
# A checkpoint file is: a magic line, a JSON header line (format version, config, payload size), a line
# with the SHA-256 of the header line and the payload together, then the torch.save bytes of the state.
# The hash covers every byte that decides the run, so an edited header is refused like a flipped bit;
# the config can still be compared without unpickling the payload.
CHECKPOINT_MAGIC = b"SUPERNET-CHECKPOINT\n"
CHECKPOINT_VERSION = 2


def _jsonable(config: Any) -> Any:
    """The config as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def save_checkpoint(path: "str | Path", state: dict) -> Path:
    """Writes `state` (which must hold a JSON-able dict under "config") atomically to `path`."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError("a checkpoint state must be a dict with a 'config' dict")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = {"version": CHECKPOINT_VERSION, "config": _jsonable(state["config"]), "size": len(payload)}
    head = json.dumps(header, sort_keys=True).encode() + b"\n"
    digest = hashlib.sha256(head + payload).hexdigest().encode() + b"\n"
    return _atomic(path, lambda f: (f.write(CHECKPOINT_MAGIC), f.write(head), f.write(digest), f.write(payload)))


def config_differences(saved: dict, expected: dict) -> list[str]:
    """'key: saved value vs expected value' for every key where two configs disagree."""
    saved, expected = _jsonable(saved), _jsonable(expected)
    return [f"{k}={saved.get(k, '<absent>')!r} in the checkpoint, {expected.get(k, '<absent>')!r} here"
            for k in sorted(set(saved) | set(expected)) if saved.get(k, "<absent>") != expected.get(k, "<absent>")]


def read_checkpoint_config(path: "str | Path") -> dict:
    """The config stored in a checkpoint's header, after checking the file is whole."""
    return _read_checkpoint(Path(path))[0]["config"]


def resume_config(run_dir: Path, options: dict) -> dict:
    """The config of the run to resume; options given again must equal the stored ones."""
    stored = read_checkpoint_config(run_dir / CHECKPOINT)
    diff = config_differences(stored, {**stored, **options})
    if diff:
        raise ValueError(f"cannot resume {str(run_dir)!r} with a different config: " + "; ".join(diff))
    return stored


def _read_checkpoint(path: Path) -> tuple[dict, bytes]:
    if not path.is_file():
        raise ValueError(f"no checkpoint at {str(path)!r}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err.strerror or err}") from None
    corrupt = f"checkpoint {str(path)!r} is corrupt"
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise ValueError(f"{corrupt}: it does not start with the supernet checkpoint marker")
    head_end = raw.find(b"\n", len(CHECKPOINT_MAGIC)) + 1
    digest_end = raw.find(b"\n", head_end) + 1
    head, digest, payload = raw[len(CHECKPOINT_MAGIC):head_end], raw[head_end:digest_end], raw[digest_end:]
    try:
        header = json.loads(head)
        version = header.get("version")
    except (ValueError, AttributeError):
        raise ValueError(f"{corrupt}: its header cannot be read") from None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has format version {version!r}; "
                         f"this supernet reads version {CHECKPOINT_VERSION}")
    if head_end == 0 or digest_end == 0 or hashlib.sha256(head + payload).hexdigest().encode() != digest.strip():
        raise ValueError(f"{corrupt}: its header and contents do not match the stored checksum "
                         f"({len(payload)} of {header.get('size')!r} payload bytes present)")
    if not isinstance(header.get("config"), dict):
        raise ValueError(f"{corrupt}: its header holds no config")
    return header, payload


def load_checkpoint(path: "str | Path", expected_config: dict | None = None,
                    map_location: "str | torch.device" = "cpu") -> dict:
    """The state saved by `save_checkpoint`, its tensors on `map_location` (a checkpoint written on one device
    loads on any other); ValueError if the file is corrupt or from a different config."""
    path = Path(path)
    header, payload = _read_checkpoint(path)
    if expected_config is not None:
        diff = config_differences(header["config"], expected_config)
        if diff:
            raise ValueError(f"checkpoint {str(path)!r} was written by a different config: " + "; ".join(diff))
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 (torch raises several types; its message suggests an unsafe load)
        raise ValueError(f"checkpoint {str(path)!r} holds objects other than tensors and plain values; "
                         "it is not loaded, since unpickling them could run code") from None


def capture_rng_state() -> dict:
    """torch, numpy and Python `random` generator states, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    extra = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {**extra, "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=<a GPU> holds it there
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])  # else the CUDA generators stay as seeded
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# --- run folders ------------------------------------------------------------------------------
# The files of a search run folder (one writer: supernet.search_run.search).
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
ALPHA_HISTORY = "alpha_history.json"
LOG = "log.txt"


def new_run_dir(root: "str | Path", prefix: str) -> Path:
    """A fresh folder `root/prefix-YYYYmmdd-HHMMSS` (with a suffix if that exists already)."""
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        for n in range(1000):
            path = root / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise ValueError(f"cannot create a run folder under {str(root)!r}: {err.strerror or err}") from None
    raise ValueError(f"cannot create a new run folder under {str(root)!r}")


def _check_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write in run folder {str(folder)!r}: {err.strerror or err}") from None


def open_run_dir(run_dir: "str | Path | None", out: "str | Path", prefix: str, resume: bool = False) -> Path:
    """The folder a run writes, checked to be writable; call it after every other check of the run.

    resume: `run_dir` must hold a checkpoint. Otherwise `run_dir`, if given, must be new or empty (a
    folder holding a run, or anything else, is refused rather than overwritten); without it a new
    folder `out/prefix-<time>` is made.
    """
    if resume:
        path = Path(run_dir)
        if not (path / CHECKPOINT).is_file():
            raise ValueError(f"cannot resume: {str(path)!r} holds no {CHECKPOINT}")
    elif run_dir is None:
        path = new_run_dir(out, prefix)
    else:
        path = Path(run_dir)
        if (path / CHECKPOINT).exists():
            raise ValueError(f"run folder {str(path)!r} already holds a run; resume it or choose another folder")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"run folder {str(path)!r} exists and is not an empty folder; choose a new one")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create run folder {str(path)!r}: {err.strerror or err}") from None
    _check_writable(path)
    return path


class RunLog:
    """Appends timestamped lines to a run's log file."""

    def __init__(self, path: "str | Path") -> None:
        self.path = Path(path)

    def __call__(self, message: str) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        except OSError as err:
            raise ValueError(f"cannot write {str(self.path)!r}: {err.strerror or err}") from None


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("supernet", "scikit-learn", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
