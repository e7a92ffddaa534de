"""The loss contract: E[∇ f_dpg_loss] = ∇ D_f(π‖p) exactly, checked against enumeration.

Statistical criterion: over B independent batches the mean gradient m has per-coordinate standard
error SE = std/√B. Unbiased ⇒ every |m − ∇D| ≤ 4.5 SE (coordinates with zero variance must match
exactly), and the relative error ‖m − ∇D‖/‖∇D‖ ≤ 4.5·‖SE‖/‖∇D‖ (the same bound on the whole
vector; E‖m − ∇D‖² = ‖SE‖²). Power: ‖SE‖/‖∇D‖ < 0.06, so the relative error is below 0.27 and a
gradient scaled by e^{-1} or turned by a wrong log Z fails (shown below).
"""

import zlib

import pytest
import torch

from fdiv_align.testing.toy import ToyAR, exponential_problem, pointwise_problem
from toy_helpers import exact_gradient, monte_carlo_gradients, unbiasedness_report

N_BATCHES, BATCH = 4000, 16


@pytest.fixture(scope="module")
def setting():
    base = ToyAR(3, 4, seed=1)
    policy = ToyAR(3, 4, seed=2, scale=0.7)
    proposal = ToyAR(3, 4, seed=2, scale=0.7)  # a different model close to the policy
    with torch.no_grad():
        proposal.logits.add_(0.3 * torch.randn(proposal.logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    return {
        "policy": policy,
        "proposal": proposal,
        "exponential": exponential_problem(base, token=0, lam=1.0),
        "pointwise": pointwise_problem(base, token=0, min_count=2),
    }


def assert_unbiased(report):
    assert report["rel_se"] < 0.06, f"test has too little power: {report}"
    assert report["const_err"] < 1e-12, report  # relative to the gradient scale (toy_helpers)
    assert report["max_abs_z"] < 4.5, report
    assert report["rel_err"] < 4.5 * report["rel_se"], report


CASES = []
for problem in ["exponential", "pointwise"]:
    for div in ["fkl", "rkl", "js", "tv", "chi2", ("alpha", 0.5)]:
        if problem == "pointwise" and div in ("rkl", "chi2"):
            continue  # infinite divergence: covered by the log_p_floor tests
        for policy_mode in ["on", "off"]:
            for baseline in [None, "moving_average", "loo"] + (["constant"] if div == "fkl" else []):
                CASES.append((problem, div, policy_mode, baseline))


def _div(spec):
    from fdiv_align import get_divergence

    return get_divergence(spec[0], alpha=spec[1]) if isinstance(spec, tuple) else spec


@pytest.mark.parametrize("problem,div,mode,baseline", CASES, ids=lambda v: str(v))
def test_mean_gradient_equals_exact_gradient(setting, problem, div, mode, baseline):
    prob, policy = setting[problem], setting["policy"]
    proposal = None if mode == "on" else setting["proposal"]
    div = _div(div)
    seed = zlib.crc32(f"{problem}/{mode}".encode()) % 1000  # not hash(): salted per process
    grads = monte_carlo_gradients(prob, policy, proposal, div, baseline, N_BATCHES, BATCH, seed=seed)
    assert_unbiased(unbiasedness_report(grads, exact_gradient(prob, policy, div)))


@pytest.mark.parametrize("div", ["fkl", "js", "tv"])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_wrong_log_z_is_detected(setting, div, mode):
    """The same check fails when the loss is given log Z + 1: the test can fail."""
    prob, policy = setting["exponential"], setting["policy"]
    proposal = None if mode == "on" else setting["proposal"]
    grads = monte_carlo_gradients(prob, policy, proposal, div, None, N_BATCHES, BATCH, seed=3, log_z_shift=1.0)
    report = unbiasedness_report(grads, exact_gradient(prob, policy, div))
    print(div, mode, report)
    with pytest.raises(AssertionError):
        assert_unbiased(report)


def test_rkl_gradient_is_invariant_to_log_z(setting):
    """For rkl a wrong log Z only shifts R by a constant, which E_π[∇log π] = 0 absorbs."""
    prob, policy = setting["exponential"], setting["policy"]
    grads = monte_carlo_gradients(prob, policy, None, "rkl", None, N_BATCHES, BATCH, seed=4, log_z_shift=1.0)
    assert_unbiased(unbiasedness_report(grads, exact_gradient(prob, policy, "rkl")))
