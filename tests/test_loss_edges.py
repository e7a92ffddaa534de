"""Edge cases of f_dpg_loss and FDivergenceLoss: P = 0, extreme log-ratios, N = 1, empty, bad input."""

import math

import pytest
import torch

from fdiv_align import FDivergenceLoss, LogZAccumulator, f_dpg_loss, get_divergence
from fdiv_align.objectives.estimators import get_baseline

ALL = ["fkl", "rkl", "js", "tv", "chi2", ("alpha", 0.5), ("alpha", 2.0)]


def div_of(spec):
    return get_divergence(spec[0], alpha=spec[1]) if isinstance(spec, tuple) else get_divergence(spec)


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-5 + torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    lq = lp.detach() + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    lP = -5 + torch.randn(n, generator=g, dtype=torch.float64)
    return lp, lq, lP


@pytest.mark.parametrize("spec", ALL, ids=str)
def test_zero_target_samples(spec):
    div = div_of(spec)
    lp, lq, lP = batch()
    lP[:2] = -math.inf
    if div.finite_where_target_is_zero:
        out = f_dpg_loss(lp, lq, lP, div, log_z=-0.5)
        assert torch.isfinite(out.loss) and torch.isfinite(out.coefficients).all()
        out.loss.backward()
        assert torch.isfinite(lp.grad).all()
        # the finite limits of docs/math.md ("Samples outside the support"): fkl R = p/π = 0, js R = −½ log 2, tv R = −½
        expected = {"fkl": 0.0, "js": -0.5 * math.log(2), "tv": -0.5}.get(div.name)
        if expected is not None:
            assert torch.allclose(out.pseudo_rewards[:2], torch.full((2,), expected, dtype=torch.float64))
    else:
        with pytest.raises(ValueError, match="log_p_floor"):
            f_dpg_loss(lp, lq, lP, div, log_z=-0.5)
        out = f_dpg_loss(lp, lq, lP, div, log_z=-0.5, log_p_floor=-30.0)
        assert torch.isfinite(out.loss)
        # the floor is exactly log P := max(log P, floor)
        lP_floor = lP.clamp_min(-30.0)
        ref = f_dpg_loss(lp, lq, lP_floor, div, log_z=-0.5)
        assert torch.allclose(out.pseudo_rewards, ref.pseudo_rewards)


@pytest.mark.parametrize("spec", ALL, ids=str)
@pytest.mark.parametrize("log_ratio", [1e4, -1e4])
def test_extreme_log_ratios_never_nan(spec, log_ratio):
    """log t = ±1e4: a finite loss where the exact coefficient is representable, else a clear error."""
    div = div_of(spec)
    lp = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    lP = lp.detach() - torch.tensor([log_ratio, 0.0], dtype=torch.float64)  # log t = [±1e4, 0] with log Z = 0
    r = div.pseudo_reward(torch.tensor([log_ratio], dtype=torch.float64))
    try:
        out = f_dpg_loss(lp, lp.detach(), lP, div, log_z=0.0)
    except FloatingPointError as exc:
        assert "overflows" in str(exc)
        assert not torch.isfinite(r).all()  # only raised when the exact value is not representable
        return
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(lp.grad).all()


def test_fkl_with_huge_ratio_in_the_safe_direction_needs_no_pi():
    """fkl's w·R = p/q is evaluated as exp(log P − log Z − log q): π never enters."""
    lp = torch.tensor([-800.0], dtype=torch.float64, requires_grad=True)  # π/q = e^-800
    lq = torch.tensor([-1.0], dtype=torch.float64)
    lP = torch.tensor([-2.0], dtype=torch.float64)
    out = f_dpg_loss(lp, lq, lP, "fkl", log_z=0.0)
    assert torch.allclose(out.coefficients, torch.tensor([math.exp(-1.0)], dtype=torch.float64))


def test_single_sample_and_ess():
    lp, lq, lP = batch(1)
    out = f_dpg_loss(lp, lq, lP, "js", log_z=0.0, baseline=get_baseline("loo"))
    assert out.ess.item() == pytest.approx(1.0)
    assert out.baselines.item() == 0.0  # leave-one-out with no other sample
    assert torch.isfinite(out.loss)


def test_ess_values():
    lp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = f_dpg_loss(lp, lp.detach(), torch.zeros(4, dtype=torch.float64), "js", 0.0)
    assert out.ess.item() == pytest.approx(4.0)
    lq = torch.log(torch.tensor([0.5, 1.0, 1.0, 1.0], dtype=torch.float64))
    w = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = f_dpg_loss(lp, lq, torch.zeros(4, dtype=torch.float64), "js", 0.0)
    assert out.ess.item() == pytest.approx(float(w.sum() ** 2 / (w**2).sum()))


def test_bad_inputs_are_clear_errors():
    lp, lq, lP = batch()
    empty = torch.zeros(0, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty batch"):
        f_dpg_loss(empty.requires_grad_(), empty, empty, "js", 0.0)
    with pytest.raises(ValueError, match="expected 6 values"):
        f_dpg_loss(lp, lq[:3], lP, "js", 0.0)
    with pytest.raises(ValueError, match="NaN"):
        f_dpg_loss(lp, lq, torch.full_like(lP, math.nan), "js", 0.0)
    with pytest.raises(ValueError, match="log_z must be finite"):
        f_dpg_loss(lp, lq, lP, "js", -math.inf)
    with pytest.raises(ValueError, match="unknown divergence"):
        f_dpg_loss(lp, lq, lP, "hellinger", 0.0)
    with pytest.raises(ValueError, match="reduction"):
        f_dpg_loss(lp, lq, lP, "js", 0.0, reduction="avg")
    with pytest.raises(ValueError, match="shape \\[N\\]"):
        f_dpg_loss(lp.view(2, 3), lq, lP, "js", 0.0)
    with pytest.raises(ValueError, match="unknown baseline"):
        get_baseline("ema")
    with pytest.raises(ValueError, match="only for 'fkl'"):
        get_baseline("constant", divergence="js")


def test_reductions_and_loss_value():
    lp, lq, lP = batch()
    out = f_dpg_loss(lp, lq, lP, "rkl", 0.3, reduction="none")
    assert out.loss.shape == (6,)
    w = torch.exp(lp.detach() - lq)
    R = -(lp.detach() - lP + 0.3) - 1.0
    assert torch.allclose(out.loss, -(w * R) * lp.detach())
    s = f_dpg_loss(lp, lq, lP, "rkl", 0.3, reduction="sum").loss
    m = f_dpg_loss(lp, lq, lP, "rkl", 0.3, reduction="mean").loss
    assert torch.allclose(s, m * 6)


def test_all_zero_batch_keeps_z_unknown_and_warns():
    acc = LogZAccumulator()
    lq = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="log Z unknown"):
        acc.update(torch.full((2,), -math.inf, dtype=torch.float64), lq)
    log_z, known = acc.log_z()
    assert not known.any() and torch.isneginf(log_z).all()
    assert acc.unknown_warnings == 1
    # the module skips those samples: loss 0, counted, and no NaN anywhere
    loss = FDivergenceLoss("js")
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning):
        out = loss(lp, lp.detach(), torch.full((2,), -math.inf, dtype=torch.float64))
    assert out.loss.item() == 0.0 and loss.skipped_samples == 2
    out.loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, dtype=torch.float64))
    assert loss.log_z.unknown_warnings == 1


def test_module_skips_only_unknown_contexts():
    loss = FDivergenceLoss("fkl", num_contexts=2)
    lp = torch.tensor([-1.0, -2.0, -1.5, -0.5], dtype=torch.float64, requires_grad=True)
    lP = torch.tensor([-1.0, -3.0, -math.inf, -math.inf], dtype=torch.float64)
    ctx = torch.tensor([0, 0, 1, 1])
    with pytest.warns(RuntimeWarning, match="1 context"):
        out = loss(lp, lp.detach(), lP, ctx)
    assert loss.skipped_samples == 2
    out.loss.backward()
    assert (lp.grad[2:] == 0).all() and (lp.grad[:2] != 0).all()
