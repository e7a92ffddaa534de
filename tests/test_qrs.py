"""Quasi-rejection sampling (fdiv_align/objectives/qrs.py) against enumeration on the toy model.

Exact: p_β = min(P, βq)/Z_β, A_β = Z_β/β, TV(p, p_β) ≤ 1 − Z_β/Z, and p_β = p once β ≥ max P/q.
Sampled: 200,000 proposal draws; the accepted samples' histogram against the exact p_β by a chi-square
test (cells with expected count < 5 merged), the number accepted against n·A_β within 4 binomial s.e.
"""

import math

import pytest
import torch

from fdiv_align.objectives.qrs import chi_square_pvalue, choose_log_beta, qrs_accept, qrs_estimates, qrs_exact
from fdiv_align.testing.toy import ToyAR, pointwise_problem, reward_problem


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


def test_evaluation_target_p_record_estimates_p_and_samples_it():
    """``fdiv_align.training.evaluation.target_p_record`` on 20,000 proposal draws of the toy reward problem (two
    contexts: the problem itself, and one whose P is 0 everywhere). IS estimates of E_p[alignment], H(p)
    and KL(p‖a) within 4 of their standard errors of the exact values; the QRS samples (β from the pilot
    half, which covers all 81 sequences, so p_β = p) pass a chi-square test against p, and the number
    accepted is within 4 binomial s.e. of (n/2)·A_β; the empty context has no pilot and proposes nothing."""
    from fdiv_align.training.evaluation import target_p_record

    problem, proposal = _problem()
    gen = torch.Generator().manual_seed(3)
    n = 20_000
    x, log_q = proposal.sample(n, generator=gen)
    V, T = 3, 4
    index = (x * (V ** torch.arange(T - 1, -1, -1))).sum(-1)
    ctx = torch.arange(n) % 2  # context 1: the empty target
    log_P = torch.where(ctx == 0, problem.target_logscores(x), torch.tensor(-math.inf, dtype=torch.float64))
    with torch.no_grad():
        log_a = problem.base.log_prob(x).double()
        all_log_a = problem.base.log_prob(problem.sequences).double()
        all_log_q = proposal.log_prob(problem.sequences).double()
    align_all = (problem.sequences == 1).double().mean(-1)
    align = align_all[index]
    rec = target_p_record(log_q.double(), log_P, log_a, align, ctx, [str(int(i)) for i in index],
                          [f"c{int(c)}" for c in ctx], seed=0)
    p = problem.log_p_all.exp()
    exact = {"target_alignment": float((p * align_all).sum()),  # the empty context has no estimate
             "target_entropy": float(-(p * problem.log_p_all).sum()),
             "target_kl_a": float((p * (problem.log_p_all - all_log_a)).sum())}
    for key, value in exact.items():
        assert abs(rec[key] - value) <= 4 * rec[key + "_se"], (key, rec[key], value, rec[key + "_se"])
    assert rec["target_contexts"] == 1 and rec["qrs_contexts_without_pilot"] == 1 and rec["qrs_proposed"] == n // 4
    pilot = (torch.arange(n) < n // 2) & (ctx == 0)
    assert len(torch.unique(index[pilot])) == V ** T
    log_beta = float((problem.target_logscores(x[pilot]) - log_q[pilot].double()).max())
    ex = qrs_exact(problem.log_p_all + problem.log_z, all_log_q, log_beta)
    assert ex.tv <= 64 * 2.0**-52
    k = rec["qrs_accepted"]
    assert abs(k - n / 4 * ex.acceptance_rate) <= 4 * math.sqrt(n / 4 * ex.acceptance_rate * (1 - ex.acceptance_rate))
    assert set(rec["qrs_samples"]["contexts"]) == {"c0"} and len(rec["qrs_samples"]["texts"]) == k
    counts = torch.bincount(torch.tensor([int(t) for t in rec["qrs_samples"]["texts"]]), minlength=V ** T)
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, all_log_q.exp()) < 1e-3  # power: the proposal itself is rejected
    assert rec["qrs_tv_bound"] == 0.0  # 1 − Ẑ_β/Ẑ with β above every sampled ratio: min(r, β) = r
