"""Comparison helper for kernel tests: counts and locates mismatches, checks NaN/inf first."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Elementwise comparison that reports how many elements differ and where; NaN/inf checked first."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    bad = ~torch.isfinite(actual) & torch.isfinite(expected)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite elements, first at {bad.nonzero()[0].tolist()}"
    a, e = actual.double(), expected.double()
    wrong = (a - e).abs() > atol + rtol * e.abs()
    assert not wrong.any(), (f"{what}: {int(wrong.sum())}/{wrong.numel()} elements differ, first at "
                             f"{wrong.nonzero()[0].tolist()}, max error {(a - e).abs().max().item():.3g}")
