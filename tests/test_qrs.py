"""Quasi-rejection sampling (fdiv_align/qrs.py) against enumeration on the toy model.

Exact: p_β = min(P, βq)/Z_β, A_β = Z_β/β, TV(p, p_β) ≤ 1 − Z_β/Z, and p_β = p once β ≥ max P/q.
Sampled: 200,000 proposal draws; the accepted samples' histogram against the exact p_β by a chi-square
test (cells with expected count < 5 merged), the number accepted against n·A_β within 4 binomial s.e.
"""

import math

import pytest
import torch

from fdiv_align.qrs import chi_square_pvalue, choose_log_beta, qrs_accept, qrs_estimates, qrs_exact
from fdiv_align.toy import ToyAR, pointwise_problem, reward_problem


def _problem():
    base = ToyAR(vocab_size=3, length=4, seed=1)
    proposal = ToyAR(vocab_size=3, length=4, seed=5, scale=0.5)
    problem = reward_problem(base, lambda x: (x == 1).sum(-1).double(), beta=0.7)
    return problem, proposal


def test_exact_qrs_matches_its_definition_and_bound():
    problem, proposal = _problem()
    with torch.no_grad():
        log_q = proposal.log_prob(problem.sequences)
    log_P = problem.target_logscores(problem.sequences)
    max_log_ratio = float((log_P - log_q).max())
    for log_beta in (max_log_ratio - 2.0, max_log_ratio - 0.5, max_log_ratio, max_log_ratio + 1.0):
        ex = qrs_exact(log_P, log_q, log_beta)
        m = torch.minimum(log_P.exp(), math.exp(log_beta) * log_q.exp())  # brute force, probability space
        assert torch.allclose(ex.log_p_beta.exp(), m / m.sum(), rtol=1e-12, atol=0)
        assert ex.acceptance_rate == pytest.approx(float(m.sum()) / math.exp(log_beta), rel=1e-12)
        assert ex.tv <= ex.tv_bound + 1e-15
        if log_beta >= max_log_ratio:  # rejection sampling: p_β = p
            assert ex.tv <= 64 * 2.0**-52 and abs(ex.tv_bound) <= 64 * 2.0**-52  # rounding of probabilities ≈ 1
        else:
            assert ex.tv > 1e-3  # clipping changes the distribution: the test can tell the two apart
    est = qrs_estimates(log_P, log_q, max_log_ratio - 0.5)  # IS over the enumeration weighted by q = exact
    weights = log_q.exp()
    exact = qrs_exact(log_P, log_q, max_log_ratio - 0.5)
    clipped = torch.minimum((log_P - log_q), torch.tensor(max_log_ratio - 0.5, dtype=torch.float64)).exp()
    assert float((weights * clipped).sum()) / math.exp(max_log_ratio - 0.5) == pytest.approx(exact.acceptance_rate, rel=1e-12)
    assert math.isfinite(est.acceptance_rate) and 0 < est.acceptance_rate <= 1


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_sampled_qrs_follows_p_beta_and_its_acceptance_rate(clip):
    problem, proposal = _problem()
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x, log_q = proposal.sample(n, generator=gen)
    log_P = problem.target_logscores(x)
    with torch.no_grad():
        all_log_q = proposal.log_prob(problem.sequences)
    all_log_P = problem.target_logscores(problem.sequences)
    log_beta = float((all_log_P - all_log_q).max()) - clip  # clip = 0: exact rejection sampling
    accepted = qrs_accept(log_P, log_q, log_beta, torch.rand(n, generator=gen, dtype=torch.float64))
    exact = qrs_exact(all_log_P, all_log_q, log_beta)
    k = int(accepted.sum())
    se = math.sqrt(n * exact.acceptance_rate * (1 - exact.acceptance_rate))
    assert abs(k - n * exact.acceptance_rate) <= 4 * se, (k, n * exact.acceptance_rate, se)
    est = qrs_estimates(log_P, log_q, log_beta)
    assert abs(est.acceptance_rate - exact.acceptance_rate) <= 4 * est.acceptance_rate_se
    V, T = 3, 4
    index = (x[accepted] * (V ** torch.arange(T - 1, -1, -1))).sum(-1)  # sequences are enumerated in base-V order
    counts = torch.bincount(index, minlength=V ** T)
    assert k >= 5000
    assert chi_square_pvalue(counts, exact.log_p_beta.exp()) > 1e-3
    if clip > 0:  # and the test has power: the same counts against p itself are rejected
        assert chi_square_pvalue(counts, problem.log_p_all.exp()) < 1e-3


def test_chi_square_pvalue_accepts_the_true_and_rejects_a_wrong_distribution():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    counts = torch.bincount(torch.multinomial(p, 10_000, replacement=True, generator=gen), minlength=4)
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)) < 1e-6


def test_a_proposal_that_misses_the_support_is_refused():
    problem = pointwise_problem(ToyAR(vocab_size=3, length=4, seed=1), token=0, min_count=2)
    log_P = problem.target_logscores(problem.sequences)
    log_q = torch.full_like(log_P, -math.log(len(log_P)))
    log_q[torch.isfinite(log_P).nonzero()[0]] = -math.inf  # one sequence of p's support never proposed
    with pytest.raises(ValueError, match="support misses the target's: 1 sequences have P"):
        qrs_exact(log_P, log_q, 0.0)
    with pytest.raises(ValueError, match="log_q must be finite"):
        qrs_accept(log_P, log_q, 0.0, torch.rand(len(log_P), dtype=torch.float64))
    with pytest.raises(ValueError, match="every one of the 4 proposal samples has P"):
        qrs_estimates(torch.full((4,), -math.inf, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="every pilot sample has P"):
        choose_log_beta(torch.full((4,), -math.inf, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
