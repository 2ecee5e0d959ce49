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


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference from a float64 result."""
    return (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def assert_error_bounded(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, what: str,
                         factor: float = 4.0, ulps: float = 8.0) -> None:
    """actual is no further from `exact` (the same computation in float64) than `factor` times the reference
    path's own error, plus `ulps` roundings of the result's scale.

    Bounds that follow the reference's error hold on every CPU: which instructions (AVX2, AVX-512) oneDNN
    picks changes the rounding of both paths alike, so a fixed atol set on one machine fails on another.
    """
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert actual.dtype == reference.dtype, f"{what}: dtype {actual.dtype} != {reference.dtype}"
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite where float64 is finite, or the reverse"
    scale = exact[finite].double().abs().max().item() if finite.any() else 0.0
    allowed = factor * max_error(reference[finite], exact[finite]) + ulps * torch.finfo(actual.dtype).eps * scale
    error = max_error(actual[finite], exact[finite])
    assert error <= allowed, f"{what}: error {error:.3g} vs float64; allowed {allowed:.3g} ({factor}x the reference's)"
