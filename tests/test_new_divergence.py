"""A new divergence is one class plus one YAML (docs/design.md, "Adding a divergence"): registered
from this test module, it is reachable by name from the config and trains the enumerable toy."""

import math

import pytest
import torch
from conftest import toy_task

from fdiv_align import Divergence, available_divergences, exact_divergence, register_divergence
from fdiv_align.objectives import divergences
from fdiv_align.config import from_dict
from fdiv_align.testing.toy import enumerable_lm, enumeration_batch, exact_trainer_divergences
from fdiv_align.training.trainer import Trainer


class SquaredHellinger(Divergence):
    """H²(π‖p) = E_p[(√t − 1)²] with t = π/p: f(t) = (√t − 1)², f′(t) = 1 − 1/√t (finite where p = 0)."""

    name = "hellinger_test"
    f_at_infinity_slope = 1.0

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def f(self, log_t):
        return self.scale * torch.expm1(0.5 * log_t) ** 2

    def f_prime(self, log_t):
        return self.scale * -torch.expm1(-0.5 * log_t)


@pytest.fixture(autouse=True)
def hellinger(monkeypatch):
    """``register_divergence("hellinger_test")`` as a user module would, on a copy of the registry that
    this test module's tests alone see."""
    monkeypatch.setattr(divergences, "_REGISTRY", divergences._REGISTRY.copy())
    register_divergence("hellinger_test")(SquaredHellinger)


def test_registered_divergence_matches_its_closed_form():
    assert "hellinger_test" in available_divergences()
    g = torch.Generator().manual_seed(0)
    pi, p = (torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0) for _ in range(2))
    want = float(((pi.sqrt() - p.sqrt()) ** 2).sum())
    got = float(exact_divergence("hellinger_test", pi.log(), p.log()))
    assert math.isclose(got, want, rel_tol=1e-12)


def test_registered_divergence_trains_the_toy_from_the_config(tmp_path):
    cfg = from_dict({"model": {"name": "tiny", "device": "cpu"},
                     "divergence": {"name": "hellinger_test", "params": {"scale": 1.0}},
                     "task": {"max_new_tokens": 3},
                     "trainer": {"steps": 40, "samples_per_step": 32, "micro_batch_size": 32, "eval_every": 0,
                                 "eval_samples": 8, "checkpoint_every": 0, "lr": 3e-2, "stop_at_eos": False,
                                 "threads": 1, "precision": "fp32"},
                     "logger": {"progress": False, "jsonl": False}})
    lm, seqs = enumerable_lm()
    tr = Trainer(cfg, lm=lm, task=toy_task("js"), output_dir=tmp_path)
    assert isinstance(tr.divergence, SquaredHellinger)
    every = enumeration_batch(lm.tokenizer, seqs)
    before = exact_trainer_divergences(tr, every, measure=("hellinger_test",))["hellinger_test"]
    tr.train()
    after = exact_trainer_divergences(tr, every, measure=("hellinger_test",))["hellinger_test"]
    print(f"\n[trainer hellinger_test] exact H²: {before:.4f} -> {after:.4f}")
    assert after <= 0.5 * before
