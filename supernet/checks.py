"""Argument checks shared by every constructor, config and command: one message format for bad input.

Each check returns the value it accepted (so it can be used inline) and raises ValueError naming the
argument, the bad value and what was expected. Booleans are never numbers here.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (1: a positive integer, 0: a non-negative one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def optional_integer(name: str, value: Any, minimum: int = 1) -> int | None:
    """None, or an integer as `integer` accepts it."""
    return None if value is None else integer(name, value, minimum)


def number(name: str, value: Any, *, positive: bool = False, non_negative: bool = False,
           minimum: float | None = None, maximum: float | None = None, open_maximum: bool = False) -> float:
    """`value` as a finite float; optionally > 0, >= 0, >= `minimum`, and <= (or <) `maximum`."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and non_negative:
        ok = value >= 0
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_maximum else value <= maximum
    if not ok:
        what = "a positive finite" if positive else "a non-negative finite" if non_negative else "a finite"
        if minimum is not None and maximum is not None and not open_maximum:
            bound = f" in [{minimum}, {maximum}]"
        else:
            bound = "" if minimum is None else f" at least {minimum}"
            bound += "" if maximum is None else f" {'below' if open_maximum else 'at most'} {maximum}"
        raise ValueError(f"{name} must be {what} number{bound}, got {value!r}")
    return float(value)


def optional_number(name: str, value: Any, **kwargs: Any) -> float | None:
    """None, or a number as `number` accepts it."""
    return None if value is None else number(name, value, **kwargs)


def fraction(name: str, value: Any) -> float:
    """A number strictly between 0 and 1."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < value < 1.0
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def choice(name: str, value: Any, options: Any) -> Any:
    """`value` if it is one of `options`."""
    options = list(options)
    if isinstance(value, bool) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {options}")
    return value


def images(x: Any, in_channels: int, dtype: torch.dtype = torch.float32, what: str = "input") -> torch.Tensor:
    """`x` if it is a (batch, in_channels, height, width) tensor of the network's parameter dtype.

    Mixed precision keeps the input in the parameters' dtype and casts inside torch.autocast.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} has shape {shape}; expected (batch, {in_channels}, height, width)")
    if x.dtype != dtype:
        raise ValueError(f"{what} has dtype {x.dtype}; expected {dtype}, the network's parameter dtype "
                         "(cast the input, or use torch.autocast for mixed precision)")
    return x
