"""Helpers shared by the tests (imported as ``from conftest import …``: pytest's default import mode puts
tests/ on sys.path).

Tolerances that hold on every CPU (AVX2, AVX-512, …) and BLAS path — rules (docs/design.md, "Testing"):
* fp64 results are compared *relative to their magnitude*: |got − want| ≤ rtol·max(|want|, scale) with
  rtol = 1e-12 (≈ 4500 ulps — room for sums reassociated by a vectorised kernel, far below any
  modelling error). An absolute tolerance alone fails on large values (an α-divergence of 1.2e6 is
  off by 3e-9 = 2.6e-15 relative between AVX2 and AVX-512 summation orders).
* ``scale`` is the magnitude of the terms that were summed when it exceeds the result (cancellation).
* bit-equality (``torch.equal``) only between results of the *same* kernel on the same inputs;
  different code paths get a rounding bound.

Trainer builders: :func:`tiny_cfg` pins ``model.device=cpu`` (these tests compare against CPU tensors;
tests/test_gpu.py covers CUDA) and ``trainer.precision=fp32``, so that the same path runs on every
machine (tests/test_precision.py forces each outcome of ``auto``).
"""

from __future__ import annotations

import torch

from fdiv_align.config import from_dict
from fdiv_align.targets import RewardScorer, Task, WordPresent

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


# ----------------------------------------------------------------------------- trainer builders


def tiny_cfg(**over):
    base = {"model": {"name": "tiny", "device": "cpu"}, "task": {"name": "amazing", "max_new_tokens": 6},
            "trainer": {"steps": 6, "samples_per_step": 8, "micro_batch_size": 8, "eval_every": 3, "eval_samples": 8,
                        "checkpoint_every": 2, "lr": 1e-2, "deterministic": True, "threads": 1,
                        "precision": "fp32"},
            "logger": {"progress": False}}
    for group, values in over.items():
        base.setdefault(group, {}).update(values)
    return from_dict(base)


def count_a(texts, contexts):
    return [t.split().count("a") for t in texts]


def toy_task(div: str) -> Task:
    """Pointwise 'contains a' for divergences finite at P = 0, a reward target for rkl/chi2."""
    if div in ("rkl", "chi2"):
        return Task("toy_reward", RewardScorer(count_a, beta=0.5, name="count_a"))
    return Task("toy_word", WordPresent("a"))
