"""Output allocation for every kernel launcher, so tests can poison fresh buffers in one place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Tests set this to NaN: an output element that a masked kernel forgets to write then fails.
FILL: float | None = None


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, filled with FILL when a test asks for it."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out if FILL is None else out.fill_(FILL)
