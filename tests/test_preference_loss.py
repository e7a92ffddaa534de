"""f-DPO (fdiv_align/objectives/preference_loss.py): DPO exactly for rkl; the population minimiser is the analytic
optimum π = π_ref · (f′)⁻¹((r + c)/β) for every valid divergence; invalid divergences are refused."""

import math

import pytest
import torch
import torch.nn.functional as F

from fdiv_align.objectives.divergences import get_divergence
from fdiv_align.objectives.preference_loss import check_f_dpo_divergence, f_dpo_loss

VALID = [("rkl", {}), ("fkl", {}), ("js", {}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 1.0})]


def test_rkl_is_the_dpo_loss():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(7, generator=g, dtype=torch.float64) for _ in range(4))
    for beta in (0.1, 0.5):
        dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()  # Rafailov et al. (2023), eq. 7
        assert float(f_dpo_loss(pc, pr, rc, rr, "rkl", beta)) == pytest.approx(float(dpo), rel=1e-14)


@pytest.mark.parametrize("name,params", [("tv", {}), ("chi2", {}), ("alpha", {"alpha": 1.5})])
def test_divergences_without_a_valid_implicit_reward_are_refused(name, params):
    with pytest.raises(ValueError, match="f-DPO needs"):
        check_f_dpo_divergence(get_divergence(name, **params))


def test_bad_inputs_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        f_dpo_loss(x, x, x, x, "rkl", 0.0)
    with pytest.raises(ValueError, match="1-D of one length"):
        f_dpo_loss(x, torch.zeros(4), x, x)
    with pytest.raises(ValueError, match="non-finite"):
        f_dpo_loss(torch.tensor([0.0, -math.inf, 0.0]), x, x, x, "rkl")


def _inverse_f_prime(div, z: torch.Tensor) -> torch.Tensor:
    """log t with f′(t) = z, by bisection on log t (f′ increasing): independent of any closed form."""
    lo, hi = torch.full_like(z, -60.0), torch.full_like(z, 60.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        up = div.f_prime(mid) < z
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return (lo + hi) / 2


def _analytic_optimum(div, log_ref, r, beta):
    """π = π_ref · (f′)⁻¹((r + c)/β), c such that Σ π = 1 (bisection on c)."""
    sup = float(div.f_prime(torch.tensor(60.0, dtype=torch.float64)))
    lo, hi = -200.0, beta * sup - float(r.max()) - 1e-12
    for _ in range(200):
        c = (lo + hi) / 2
        total = float(torch.logsumexp(log_ref + _inverse_f_prime(div, (r + c) / beta), 0))
        lo, hi = (c, hi) if total < 0 else (lo, c)
    log_pi = log_ref + _inverse_f_prime(div, (r + (lo + hi) / 2) / beta)
    return log_pi - torch.logsumexp(log_pi, 0)


@pytest.mark.parametrize("name,params", VALID)
def test_population_minimiser_is_the_analytic_optimum(name, params):
    """K responses of one prompt, true reward r, Bradley–Terry labels P(y_i ≻ y_j) = σ(r_i − r_j), every
    pair equally likely: the exact population f-DPO loss, minimised over π = softmax(θ), reaches π*."""
    div = get_divergence(name, **params)
    g = torch.Generator().manual_seed(1)
    K, beta = 6, 0.7
    log_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    r = torch.randn(K, generator=g, dtype=torch.float64)
    i, j = torch.triu_indices(K, K, 1)
    p_ij = torch.sigmoid(r[i] - r[j])  # probability that y_i is chosen over y_j

    theta = log_ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        log_pi = torch.log_softmax(theta, 0)
        loss = 0.0
        for k in range(len(i)):  # both orders of each pair, weighted by their Bradley–Terry probability
            a, b = i[k:k + 1], j[k:k + 1]
            loss = loss + p_ij[k] * f_dpo_loss(log_pi[a], log_pi[b], log_ref[a], log_ref[b], div, beta) \
                + (1 - p_ij[k]) * f_dpo_loss(log_pi[b], log_pi[a], log_ref[b], log_ref[a], div, beta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    got = torch.log_softmax(theta.detach(), 0)
    want = _analytic_optimum(div, log_ref, r, beta)
    assert float((got.exp() - want.exp()).abs().max()) < 1e-7, (got.exp(), want.exp())
    if name == "rkl":  # the familiar closed form: π* ∝ π_ref · exp(r/β)
        closed = torch.log_softmax(log_ref + r / beta, 0)
        assert float((want.exp() - closed.exp()).abs().max()) <= 1e-10 * float(closed.exp().max())  # relative


@pytest.mark.parametrize("trl_type,ours,ours_beta_factor", [
    ("reverse_kl", ("rkl", {}), 1.0),  # DPO
    ("forward_kl", ("fkl", {}), 1.0),  # TRL's f′ = 1 − 1/t: ours + 1, a constant that cancels
    ("js_divergence", ("js", {}), 2.0),  # TRL's f′ = log(2t/(1+t)) = 2 × ours (the library's JS is ½ of TRL's)
    ("alpha_divergence", ("alpha", {"alpha": 0.5}), 1.0),  # the same f′ = (t^{α−1} − 1)/(α−1)
])
def test_f_dpo_loss_equals_trl_dpo_trainer_on_the_same_tensors(trl_type, ours, ours_beta_factor):
    """TRL's own DPOTrainer._compute_loss (sigmoid loss) run on given sequence log-probs (a stand-in model
    returns them as one-token completions; reference log-probs precomputed): our f_dpo_loss at the
    mapped β gives the same value."""
    from collections import defaultdict
    from types import SimpleNamespace

    trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]' (CI installs it)")

    g = torch.Generator().manual_seed(2)
    B, beta = 5, 0.3
    pc, pr, rc, rr = (-3 * torch.rand(B, generator=g) for _ in range(4))  # fp32: TRL's alpha path supports no fp64
    logps = torch.cat([pc, pr])[:, None]  # [2B, 1]: chosen rows, then rejected rows, one completion token each
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                                                           gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type=trl_type,
        f_alpha_divergence_coef=0.5, loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace())
    inputs = {"input_ids": torch.ones(2 * B, 2, dtype=torch.long), "attention_mask": torch.ones(2 * B, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * (2 * B)), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    out = trl.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    trl_loss = out[0] if isinstance(out, tuple) else out
    name, params = ours
    mine = f_dpo_loss(pc, pr, rc, rr, get_divergence(name, **params), beta * ours_beta_factor)
    assert float(mine) == pytest.approx(float(trl_loss), rel=1e-6)  # fp32, two orders of operations
