"""The one place that decides between fused kernels and their PyTorch references."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def mixed_sum(outputs: Sequence[torch.Tensor], weights: Optional[torch.Tensor], fused: bool = False) -> torch.Tensor:
    """sum_i weights[i] * outputs[i] (a plain sum when weights is None)."""
    if weights is None:
        total = outputs[0]
        for o in outputs[1:]:
            total = total + o
        return total
    total = weights[0] * outputs[0]
    for i in range(1, len(outputs)):
        total = total + weights[i] * outputs[i]
    return total
