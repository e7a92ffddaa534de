"""Tolerances that hold on every CPU (AVX2, AVX-512, …) and BLAS path.

Rules (docs/design.md, "Testing"):
* fp64 results are compared *relative to their magnitude*: |got − want| ≤ rtol·max(|want|, scale) with
  rtol = 1e-12 (≈ 4500 ulps — room for sums reassociated by a vectorised kernel, far below any
  modelling error). An absolute tolerance alone fails on large values (an α-divergence of 1.2e6 is
  off by 3e-9 = 2.6e-15 relative between AVX2 and AVX-512 summation orders).
* ``scale`` is the magnitude of the terms that were summed when it exceeds the result (cancellation).
* bit-equality (``torch.equal``) only between results of the *same* kernel on the same inputs;
  different code paths get a rounding bound.
"""

from __future__ import annotations

import torch

RTOL64 = 1e-12


def close64(got, want, scale: float = 1.0, rtol: float = RTOL64) -> bool:
    got, want = float(got), float(want)
    return abs(got - want) <= rtol * max(abs(want), abs(scale), 1e-300)


def assert_close64(got, want, scale: float = 1.0, rtol: float = RTOL64, what: str = "") -> None:
    assert close64(got, want, scale, rtol), f"{what}: got {float(got)!r}, want {float(want)!r}, " \
        f"|diff| {abs(float(got) - float(want)):.3g} > {rtol:g}·max(|want|, {scale:g})"


def assert_allclose64(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0, rtol: float = RTOL64, what: str = "") -> None:
    """Elementwise: |got − want| ≤ rtol·max(|want|, scale)."""
    bound = rtol * torch.clamp(want.abs(), min=scale)
    diff = (got - want).abs()
    assert bool((diff <= bound).all()), f"{what}: max |diff| {float(diff.max()):.3g}, bound {float(bound.min()):.3g}"
