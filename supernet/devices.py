"""Where and in what precision a run computes: device strings, autocast and the fp16 gradient scaler.

The run (search, sample, meta) owns the device and the precision; networks and mixing rules know
neither. `resolve_device` turns `auto|cpu|cuda|cuda:N` into a `torch.device` (ValueError naming the
problem when no such device exists); `Precision` wraps the autocast context and, for fp16, the
gradient scaler. Parameters (alphas included) stay fp32; autocast casts inside the forward.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import checks

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: "str | torch.device | None" = "auto") -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda` or `cuda:N` as a torch.device; ValueError otherwise.

    Under torchrun, `auto` and `cuda` take the process's LOCAL_RANK-th GPU.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None:
        spec = "auto"
    if not isinstance(spec, str):
        raise ValueError(f"device must be a string such as {'|'.join(DEVICES)}, got {spec!r}")
    text = spec.strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local % torch.cuda.device_count())
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else None
        if index_text is not None and not index_text.isdigit():
            raise ValueError(f"unknown device {spec!r}; expected one of {list(DEVICES)} (N a GPU index)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked for, but torch sees no CUDA GPU here "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        count = torch.cuda.device_count()
        index = int(index_text) if index_text is not None else local
        if index >= count:
            raise ValueError(f"device {spec!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                             f"GPU{'' if count == 1 else 's'} (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {spec!r}; expected one of {list(DEVICES)} (N a GPU index)")


def fp16_supported(device: torch.device) -> str | None:
    """None if fp16 autocast with a gradient scaler works on `device`, else why not."""
    try:
        conv = torch.nn.Conv2d(1, 1, 1).to(device)
        with torch.autocast(device.type, dtype=torch.float16):
            out = conv(torch.ones(1, 1, 2, 2, device=device))
        if out.dtype != torch.float16:
            return f"autocast on {device.type} does not run convolutions in float16"
        torch.amp.GradScaler(device.type)
    except Exception as err:  # noqa: BLE001 (any failure means: not supported here)
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


@dataclass
class Precision:
    """Mixed precision of a run: `autocast()` for forwards; `scaler` (fp16 only) for the losses."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        checks.choice("precision", self.name, PRECISIONS)
        self.dtype = PRECISIONS[self.name]
        self.scaler = None
        if self.name == "fp16":
            why = fp16_supported(self.device)
            if why is not None:
                raise ValueError(f"precision fp16 is not supported on {self.device} by torch {torch.__version__} "
                                 f"({why}); use bf16 or fp32")
            self.scaler = torch.amp.GradScaler(self.device.type)

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: scaled for fp16, as it is otherwise."""
        return loss if self.scaler is None else self.scaler.scale(loss)


def to_device(batch, device: torch.device):
    """A (images, labels) batch (or any tuple of tensors) on `device`."""
    non_blocking = device.type == "cuda"
    return tuple(t.to(device, non_blocking=non_blocking) for t in batch)
