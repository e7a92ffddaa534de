"""Divergence functionals against closed forms (float64), f′ against autograd, α limits."""

import math

import pytest
import torch

from fdiv_align import available_divergences, exact_divergence, get_divergence
from conftest import assert_close64

F64 = torch.float64  # explicit everywhere: no global default-dtype change leaking into other tests


def random_dists(seed, n=50, zeros_in_p=False):
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(2 * torch.randn(n, generator=g, dtype=F64), 0)
    p = torch.softmax(2 * torch.randn(n, generator=g, dtype=F64), 0)
    if zeros_in_p:
        p[: n // 5] = 0
        p = p / p.sum()
    return pi, p


def closed_forms(pi, p, alpha=0.5):
    m = (pi + p) / 2
    kl = lambda a, b: torch.sum(torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)))  # noqa: E731
    return {
        "fkl": kl(p, pi),
        "rkl": kl(pi, p),
        "js": 0.5 * kl(pi, m) + 0.5 * kl(p, m),
        "tv": 0.5 * torch.sum(torch.abs(pi - p)),
        "chi2": torch.sum((pi - p) ** 2 / p),
        # Amari α: (1 − Σ π^α p^{1−α}) / (α(1−α))
        "alpha": (1 - torch.sum(pi**alpha * p ** (1 - alpha))) / (alpha * (1 - alpha)),
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["fkl", "rkl", "js", "tv", "chi2", "alpha"])
def test_sum_p_f_equals_closed_form(name, seed):
    pi, p = random_dists(seed)
    kwargs = {"alpha": 0.5} if name == "alpha" else {}
    value = exact_divergence(get_divergence(name, **kwargs), pi.log(), p.log())
    expected = closed_forms(pi, p)[name]
    assert_close64(value, expected, what=name)


@pytest.mark.parametrize("alpha", [-1.0, 0.3, 2.0, 3.5])
def test_alpha_closed_form_other_alphas(alpha):
    pi, p = random_dists(7)
    value = exact_divergence(get_divergence("alpha", alpha=alpha), pi.log(), p.log())
    expected = (1 - torch.sum(pi**alpha * p ** (1 - alpha))) / (alpha * (1 - alpha))
    assert_close64(value, expected, what=f"alpha={alpha}")


@pytest.mark.parametrize("name", ["fkl", "js", "tv"])
def test_targets_with_zeros_are_finite_and_exact(name):
    pi, p = random_dists(3, zeros_in_p=True)
    value = exact_divergence(name, pi.log(), p.log())
    expected = closed_forms(pi, p)[name]
    assert math.isfinite(float(value))
    assert_close64(value, expected, what=name)


@pytest.mark.parametrize("name", ["rkl", "chi2"])
def test_targets_with_zeros_infinite_divergences(name):
    pi, p = random_dists(3, zeros_in_p=True)
    assert math.isinf(float(exact_divergence(name, pi.log(), p.log())))


@pytest.mark.parametrize("name,kwargs", [("fkl", {}), ("rkl", {}), ("js", {}), ("tv", {}), ("chi2", {}),
                                         ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 2.5}),
                                         ("alpha", {"alpha": 0.0}), ("alpha", {"alpha": 1.0})])
def test_f_prime_is_derivative_of_f(name, kwargs):
    div = get_divergence(name, **kwargs)
    log_t = torch.linspace(-6, 6, 101, dtype=F64)
    log_t = log_t[log_t.abs() > 1e-3]  # TV's kink at t = 1
    t = log_t.exp().requires_grad_(True)
    (grad,) = torch.autograd.grad(div.f(t.log()).sum(), t)
    assert torch.allclose(div.f_prime(log_t), grad, rtol=1e-9, atol=1e-10)
    assert torch.allclose(div.pseudo_reward(log_t), -grad, rtol=1e-9, atol=1e-10)
    assert abs(float(div.f(torch.zeros(1, dtype=F64)))) < 1e-15  # exact zero: f(1) = 0


@pytest.mark.parametrize("limit,name", [(0.0, "fkl"), (1.0, "rkl")])
def test_alpha_limits_match_kl(limit, name):
    pi, p = random_dists(11)
    kl = float(exact_divergence(name, pi.log(), p.log()))
    for eps in [0.0, 1e-9, -1e-9, 1e-5, -1e-5]:
        alpha = limit + eps
        value = float(exact_divergence(get_divergence("alpha", alpha=alpha), pi.log(), p.log()))
        assert math.isfinite(value)
        assert abs(value - kl) < 1e-4 * max(1.0, abs(eps) * 1e5), (alpha, value, kl)
    exact_limit = float(exact_divergence(get_divergence("alpha", alpha=limit), pi.log(), p.log()))
    assert_close64(exact_limit, kl, what=f"alpha={limit}")
    # the gradient direction also matches: f′ differs from the KL's by a constant at most
    log_t = torch.linspace(-3, 3, 13, dtype=F64)
    diff = get_divergence("alpha", alpha=limit).f_prime(log_t) - get_divergence(name).f_prime(log_t)
    if name == "rkl":
        assert torch.allclose(diff, torch.full_like(diff, -1.0))
    else:
        assert torch.allclose(diff, torch.ones_like(diff))


def test_pseudo_rewards_table():
    """The pseudo-rewards of docs/math.md ("Divergences") written in terms of π and p."""
    pi, p = torch.tensor([0.2, 0.5, 0.01], dtype=F64), torch.tensor([0.4, 0.1, 0.3], dtype=F64)
    lt = (pi / p).log()
    assert torch.allclose(get_divergence("fkl").pseudo_reward(lt), p / pi)
    assert torch.allclose(get_divergence("rkl").pseudo_reward(lt), (p / pi).log() - 1)
    assert torch.allclose(get_divergence("js").pseudo_reward(lt), 0.5 * ((pi + p) / (2 * pi)).log())
    assert torch.allclose(get_divergence("tv").pseudo_reward(lt), 0.5 * torch.sign(p - pi))
    assert torch.allclose(get_divergence("chi2").pseudo_reward(lt), 2 * (1 - pi / p))
    a = 0.3
    assert torch.allclose(get_divergence("alpha", alpha=a).pseudo_reward(lt), -((pi / p) ** (a - 1) - 1) / (a - 1))


def test_registry_errors():
    assert set(available_divergences()) == {"rkl", "fkl", "js", "tv", "alpha", "chi2"}
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*alpha, chi2, fkl, js, rkl, tv"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="does not accept"):
        get_divergence("js", alpha=0.5)
    with pytest.raises(ValueError, match="finite"):
        get_divergence("alpha", alpha=float("nan"))


def test_extreme_log_ratios_no_nan():
    log_t = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4, math.inf], dtype=F64)
    for name, kw in [("fkl", {}), ("rkl", {}), ("js", {}), ("tv", {}), ("chi2", {}), ("alpha", {"alpha": 0.5})]:
        r = get_divergence(name, **kw).pseudo_reward(log_t)
        assert not torch.isnan(r).any(), (name, r)
    # bounded pseudo-rewards stay finite everywhere, including P = 0 (log t = +inf)
    for name in ["js", "tv"]:
        assert torch.isfinite(get_divergence(name).pseudo_reward(log_t)).all()
