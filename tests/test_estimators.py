"""IS estimators of docs/math.md ("Estimates reported during training") against exact enumerated values; log-Z accumulator; baselines."""

import math

import pytest
import torch

from fdiv_align import LogZAccumulator, estimate_divergences, get_divergence
from fdiv_align.objectives.estimators import estimate_f_divergence
from fdiv_align.objectives.estimators import LeaveOneOutBaseline, MovingAverageBaseline
from fdiv_align.testing.toy import ToyAR, exponential_problem, pointwise_problem


@pytest.fixture(scope="module")
def models():
    base = ToyAR(3, 4, seed=1)
    policy = ToyAR(3, 4, seed=2, scale=0.7)
    proposal = ToyAR(3, 4, seed=3, scale=0.5)
    return base, policy, proposal


def exact_values(problem, policy, b_all):
    with torch.no_grad():
        lp_all = policy.log_prob(problem.sequences)
        out = {k: float(problem.exact_divergence(k, policy)) for k in ["fkl", "rkl", "js", "tv"]}
    out = {"kl_p_pi": out["fkl"], "kl_pi_p": out["rkl"], "js": out["js"], "tv": out["tv"]}
    out["z"] = math.exp(problem.log_z)
    out["alignment"] = float((lp_all.exp() * b_all).sum())
    out["kl_pi_a"] = float((lp_all.exp() * (lp_all - problem.base.log_prob(problem.sequences))).sum())
    return out


@pytest.mark.parametrize("problem_name", ["exponential", "pointwise"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_estimates_match_exact_within_stderr(models, problem_name, on_policy):
    base, policy, proposal = models
    problem = exponential_problem(base, 0, 1.0) if problem_name == "exponential" else pointwise_problem(base, 0, 2)
    q = policy if on_policy else proposal
    b_all = (problem.sequences == 0).sum(-1).to(torch.float64)
    exact = exact_values(problem, policy, b_all)
    x, lq = q.sample(40000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = policy.log_prob(x)
    lP = problem.target_logscores(x)
    log_z_hat = torch.logsumexp(lP - lq, 0) - math.log(len(x))  # Ẑ from the same samples
    est = estimate_divergences(lp, lq, lP, log_z_hat, base_logprobs=base.log_prob(x).detach(),
                               alignment_scores=(x == 0).sum(-1))
    for key, value in exact.items():
        if math.isinf(value):  # KL(π‖p) on the pointwise target: the estimator must say ∞ too
            assert math.isinf(est[key].value)
            continue
        e = est[key]
        assert abs(e.value - value) < 4.5 * e.stderr, (key, e, value)
        assert e.stderr < 0.05 * max(abs(value), 0.05), (key, e)  # enough power to mean something


@pytest.mark.parametrize("spec", ["fkl", "rkl", "js", "tv", "chi2", ("alpha", 0.5)])
@pytest.mark.parametrize("problem_name", ["exponential", "pointwise"])
def test_f_divergence_estimate_from_f_alone(models, spec, problem_name):
    """estimate_f_divergence (any divergence, from f and its slope at ∞) against the exact value, from
    40,000 samples of a proposal q ≠ π with the exact Z: within 4.5 standard errors (∞ where it is ∞)."""
    base, policy, proposal = models
    problem = exponential_problem(base, 0, 1.0) if problem_name == "exponential" else pointwise_problem(base, 0, 2)
    div = get_divergence(spec[0], alpha=spec[1]) if isinstance(spec, tuple) else get_divergence(spec)
    exact = float(problem.exact_divergence(div, policy))
    x, lq = proposal.sample(40000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = policy.log_prob(x)
    e = estimate_f_divergence(div, lp, lq, problem.target_logscores(x), problem.log_z)
    if math.isinf(exact):
        assert math.isinf(e.value)
        return
    assert abs(e.value - exact) < 4.5 * e.stderr, (spec, e, exact)
    assert e.stderr < 0.1 * max(abs(exact), 0.05), (spec, e)  # enough power to mean something


def test_js_estimate_unbiased_off_policy(models):
    """With the exact Z, the JS estimate from samples of q ≠ π is unbiased: mean of 2,000 small
    batches within 4.5 SE of the exact JS."""
    base, policy, proposal = models
    problem = exponential_problem(base, 0, 1.0)
    exact = float(problem.exact_divergence("js", policy))
    x, lq = proposal.sample(2000 * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = policy.log_prob(x)
    lP = problem.target_logscores(x)
    vals = torch.tensor([estimate_divergences(lp[i::2000], lq[i::2000], lP[i::2000], problem.log_z)["js"].value
                         for i in range(2000)])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(float(vals.mean()) - exact) < 4.5 * float(se)
    assert float(se) < 0.02 * exact


def test_log_z_accumulator_unbiased_and_mergeable(models):
    base, policy, proposal = models
    problem = pointwise_problem(base, 0, 2)
    acc, parts = LogZAccumulator(), [LogZAccumulator(), LogZAccumulator()]
    g = torch.Generator().manual_seed(2)
    terms = []
    for step in range(20):
        x, lq = proposal.sample(500, generator=g)
        lP = problem.target_logscores(x)
        acc.update(lP, lq)
        parts[step % 2].update(lP, lq)
        terms.append(torch.exp(lP - lq))
    terms = torch.cat(terms)
    log_z, known = acc.log_z()
    assert known.all()
    se = float(terms.std() / math.sqrt(len(terms)))
    assert abs(math.exp(float(log_z)) - math.exp(problem.log_z)) < 4.5 * se
    assert abs(math.exp(float(log_z)) - float(terms.mean())) < 1e-12 * float(terms.mean()) + 1e-15
    merged = parts[0].merge(parts[1])
    assert torch.allclose(merged.log_z()[0], log_z)
    restored = LogZAccumulator()
    restored.load_state_dict(acc.state_dict())
    assert torch.equal(restored.log_z()[0], log_z)


def test_log_z_per_context():
    acc = LogZAccumulator()
    lq = torch.zeros(4, dtype=torch.float64)
    acc.update(torch.log(torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64)), lq, torch.tensor([0, 0, 2, 2]))
    log_z, known = acc.log_z(torch.tensor([0, 1, 2]))
    assert known.tolist() == [True, False, True]
    assert torch.allclose(log_z[[0, 2]], torch.log(torch.tensor([2.0, 20.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="context_ids"):
        acc.update(lq, lq, torch.tensor([0, 1]))


def test_baselines_do_not_use_their_own_sample():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    loo = LeaveOneOutBaseline()(r, w, torch.tensor([0, 0, 0, 1]))
    assert torch.allclose(loo, torch.tensor([2.5, 2.0, 1.5, 0.0], dtype=torch.float64))
    ma = MovingAverageBaseline(0.5)
    assert torch.equal(ma(r, w), torch.zeros(4, dtype=torch.float64))
    ma.update(r, w)
    assert torch.allclose(ma(r, w), torch.full((4,), 4.0, dtype=torch.float64))
    ma.update(torch.zeros(4, dtype=torch.float64), w)
    assert ma.value == pytest.approx(2.0)
