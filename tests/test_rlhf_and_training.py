"""RLHF equivalence of `rkl`, and plain minimisation loops on the toy model."""


import pytest
import torch
from conftest import assert_close64

from fdiv_align import f_dpg_loss, get_divergence
from fdiv_align.objectives.estimators import LeaveOneOutBaseline
from fdiv_align.testing.toy import ToyAR, exponential_problem, minimise, pointwise_problem, reward_problem


def toy_reward(x):
    return (x == 1).sum(-1).to(torch.float64) - 0.5 * (x[:, 0] == 2).to(torch.float64)


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_rkl_pseudo_reward_is_kl_penalised_reward(beta):
    """P = a·exp(r/β): R_rkl = r/β − log(π/a) − log Z − 1, i.e. the KL-penalised reward up to one constant."""
    base, policy = ToyAR(3, 4, seed=1), ToyAR(3, 4, seed=2)
    problem = reward_problem(base, toy_reward, beta)
    x, lq = policy.sample(64, generator=torch.Generator().manual_seed(0))
    lp = policy.log_prob(x)
    la = base.log_prob(x).detach()
    out = f_dpg_loss(lp, lq, problem.target_logscores(x), "rkl", problem.log_z)
    penalised = toy_reward(x) / beta - (lp.detach() - la)
    diff = out.pseudo_rewards - penalised
    scale = float(penalised.abs().max())  # terms of that size were subtracted
    assert float(diff.max() - diff.min()) <= 1e-12 * scale  # one constant per batch …
    assert_close64(diff.mean(), -problem.log_z - 1.0, scale=scale)  # … equal to −log Z − 1
    # and with a leave-one-out baseline the gradient is RLOO on the KL-penalised reward r − β log(π/a), over β
    out = f_dpg_loss(lp, lq, problem.target_logscores(x), "rkl", problem.log_z, baseline=LeaveOneOutBaseline())
    (g_ours,) = torch.autograd.grad(out.loss, policy.logits)
    rew = toy_reward(x) - beta * (lp.detach() - la)
    adv = rew - (rew.sum() - rew) / (len(rew) - 1)
    (g_rloo,) = torch.autograd.grad(-(adv * policy.log_prob(x)).mean() / beta, policy.logits)
    assert torch.allclose(g_ours, g_rloo, rtol=1e-10, atol=1e-12 * float(g_rloo.abs().max()))


@pytest.mark.parametrize("problem_name,divs", [
    ("exponential", ["fkl", "rkl", "js", "tv", "chi2", ("alpha", 0.5)]),
    ("pointwise", ["fkl", "js", "tv", ("alpha", 0.5)]),
])
def test_plain_loop_halves_each_divergence(problem_name, divs, capsys):
    base = ToyAR(3, 4, seed=1)
    problem = exponential_problem(base, 0, 1.5) if problem_name == "exponential" else pointwise_problem(base, 0, 2)
    for spec in divs:
        div = get_divergence(spec[0], alpha=spec[1]) if isinstance(spec, tuple) else get_divergence(spec)
        with torch.no_grad():
            start = float(problem.exact_divergence(div, base))
        result = minimise(problem, div, steps=150, batch_size=32, lr=0.1, seed=0)
        end = result["curve"][-1]
        with capsys.disabled():
            print(f"\n[{problem.name}] {div!r}: exact D {start:.4f} -> {end:.4f}")
        assert end <= 0.5 * start, (div, start, end)


def test_rkl_with_floor_trains_on_pointwise_target():
    """rkl/chi2 on a target with zeros: with a log-P floor the loop still moves towards the support."""
    base = ToyAR(3, 4, seed=1)
    problem = pointwise_problem(base, 0, 2)
    support = (problem.sequences == 0).sum(-1) >= 2
    with torch.no_grad():
        before = float(base.log_prob(problem.sequences).exp()[support].sum())
    result = minimise(problem, "rkl", steps=150, batch_size=32, lr=0.1, log_p_floor=-20.0)
    with torch.no_grad():
        after = float(result["policy"].log_prob(problem.sequences).exp()[support].sum())
    assert after > 0.95 and after > before + 0.3, (before, after)
