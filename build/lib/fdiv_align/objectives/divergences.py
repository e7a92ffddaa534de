"""f-divergences D_f(π‖p) = E_{x∼p}[f(π(x)/p(x))], evaluated in log space.

Convention (docs/math.md, "Divergences"; fixed for the whole library): t = π(x)/p(x), f convex, f(1) = 0.
Every function here takes ``log_t = log π − log p`` and never forms t itself unless that is
safe. The pseudo-reward is R = −f′(t); the f-DPG gradient is ∇D = E_π[f′(t) ∇ log π].

=========  ===========================================  ======================================
name       divergence                                   f(t)
=========  ===========================================  ======================================
``fkl``    KL(p‖π)  (forward KL, GDC/DPG)               −log t
``rkl``    KL(π‖p)  (reverse KL, RLHF)                  t log t
``js``     ½KL(π‖m)+½KL(p‖m), m=(π+p)/2                 ½[t log t − (1+t) log((1+t)/2)]
``tv``     ½ Σ|π−p|                                     ½|t−1|
``alpha``  Amari α (α→1: KL(π‖p), α→0: KL(p‖π))         (t^α − αt − (1−α)) / (α(α−1))
``chi2``   Pearson χ²(π‖p) = Σ (π−p)²/p                 (t−1)²
=========  ===========================================  ======================================

``f_at_infinity_slope`` is lim_{t→∞} f(t)/t: the contribution per unit of π of points where
p = 0 (so that Σ_x p f(π/p) is defined on targets with zeros). When it is infinite the
divergence is infinite as soon as π puts mass where p has none; for the *loss*, such
divergences (``rkl``, ``chi2``, ``alpha`` with α ≥ 1) need a floor on log P (see
:mod:`fdiv_align.objectives.loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Registry

LOG2 = math.log(2.0)

__all__ = [
    "needs_floor",
    "floored_log_target",
    "Divergence",
    "ReverseKL",
    "ForwardKL",
    "JensenShannon",
    "TotalVariation",
    "AlphaDivergence",
    "ChiSquared",
    "get_divergence",
    "register_divergence",
    "available_divergences",
    "exact_divergence",
    "f_divergence_terms",
]


class Divergence:
    """Base class: subclasses give f and f′ as functions of log t (tensors, any dtype)."""

    name: str = "abstract"
    #: lim_{t→∞} f(t)/t; math.inf when a sample with p = 0 makes the divergence infinite.
    f_at_infinity_slope: float = math.inf

    def f(self, log_t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f_prime(self, log_t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pseudo_reward(self, log_t: torch.Tensor) -> torch.Tensor:
        """R = −f′(t): the reward whose policy gradient descends D_f."""
        return -self.f_prime(log_t)

    def weighted_pseudo_reward(self, log_w: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        """w·R with w = π/q. Overridden where a product of two huge/small numbers is unsafe."""
        return torch.exp(log_w) * self.pseudo_reward(log_t)

    @property
    def finite_where_target_is_zero(self) -> bool:
        """True when p(x) = 0 (log t = +∞) gives a finite pseudo-reward."""
        return math.isfinite(self.f_at_infinity_slope)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ForwardKL(Divergence):
    """KL(p‖π): f(t) = −log t, f′(t) = −1/t, R = p/π."""

    name = "fkl"
    f_at_infinity_slope = 0.0

    def f(self, log_t):
        return -log_t

    def f_prime(self, log_t):
        return -torch.exp(-log_t)

    def weighted_pseudo_reward(self, log_w, log_t):
        # w·p/π = p/q = exp(log w − log t): needs no π and is 0 when P = 0.
        return torch.exp(log_w - log_t)


class ReverseKL(Divergence):
    """KL(π‖p): f(t) = t log t, f′(t) = log t + 1, R = log(p/π) − 1."""

    name = "rkl"
    f_at_infinity_slope = math.inf

    def f(self, log_t):
        return torch.exp(log_t) * log_t

    def f_prime(self, log_t):
        return log_t + 1.0


class JensenShannon(Divergence):
    """JS(π,p) = ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2, natural log (max value log 2).

    f(t) = ½[t log t − (1+t) log((1+t)/2)] = ½[t(log 2 − softplus(−log t)) − softplus(log t) + log 2]
    f′(t) = ½ log(2t/(1+t)) = ½(log 2 − softplus(−log t)).
    """

    name = "js"
    f_at_infinity_slope = 0.5 * LOG2

    def f(self, log_t):
        t = torch.exp(log_t)
        # t·(…) is 0·finite when t = 0 and ∞·log 2 when t = ∞: both well defined.
        return 0.5 * (t * (LOG2 - F.softplus(-log_t)) - F.softplus(log_t) + LOG2)

    def f_prime(self, log_t):
        return 0.5 * (LOG2 - F.softplus(-log_t))


class TotalVariation(Divergence):
    """TV(π,p) = ½ Σ|π−p|: f(t) = ½|t−1|, f′(t) = ½ sign(t−1) (0 at t = 1)."""

    name = "tv"
    f_at_infinity_slope = 0.5

    def f(self, log_t):
        return 0.5 * torch.abs(torch.expm1(log_t))

    def f_prime(self, log_t):
        return 0.5 * torch.sign(log_t)


class ChiSquared(Divergence):
    """Pearson χ²(π‖p) = Σ (π−p)²/p: f(t) = (t−1)², f′(t) = 2(t−1), R = 2(1 − π/p)."""

    name = "chi2"
    f_at_infinity_slope = math.inf

    def f(self, log_t):
        return torch.expm1(log_t) ** 2

    def f_prime(self, log_t):
        return 2.0 * torch.expm1(log_t)


class AlphaDivergence(Divergence):
    """Amari α-divergence, f(t) = (t^α − αt − (1−α)) / (α(α−1)).

    f′(t) = (t^{α−1} − 1)/(α−1). Limits (handled exactly, no division by zero):
    α → 1: f = t log t − t + 1, f′ = log t   (KL(π‖p); differs from ``rkl``'s f by the linear
    term 1 − t, which integrates to 0 under p, and its f′ by the constant 1)
    α → 0: f = t − 1 − log t, f′ = 1 − 1/t   (KL(p‖π); same remark against ``fkl``).
    Written with expm1 so that α near 0 or 1 loses no precision:
    f = [expm1(α log t)/α − expm1(log t)] / (α−1),  f′ = expm1((α−1) log t)/(α−1).
    """

    name = "alpha"
    #: |α| or |α−1| below this use the closed-form limit (its error is O(|α−limit|) ≤ 1e-7 relative;
    #: outside, the general form loses at most ~1e-16/|α−limit| to cancellation).
    LIMIT_EPS = 1e-7

    def __init__(self, alpha: float = 0.5):
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha divergence: alpha must be a finite number, got {alpha!r}")
        self.alpha = alpha
        self.f_at_infinity_slope = 1.0 / (1.0 - alpha) if alpha < 1.0 - self.LIMIT_EPS else math.inf

    def _near(self, value: float) -> bool:
        return abs(self.alpha - value) < self.LIMIT_EPS

    def f(self, log_t):
        a = self.alpha
        if self._near(1.0):
            return torch.exp(log_t) * log_t - torch.expm1(log_t)
        if self._near(0.0):
            return torch.expm1(log_t) - log_t
        return (torch.expm1(a * log_t) / a - torch.expm1(log_t)) / (a - 1.0)

    def f_prime(self, log_t):
        a = self.alpha
        if self._near(1.0):
            return log_t.clone()
        return torch.expm1((a - 1.0) * log_t) / (a - 1.0)

    def __repr__(self) -> str:
        return f"AlphaDivergence(alpha={self.alpha})"


_REGISTRY = Registry("divergence", {"rkl": ReverseKL, "fkl": ForwardKL, "js": JensenShannon, "tv": TotalVariation,
                                     "alpha": AlphaDivergence, "chi2": ChiSquared})


def _check_divergence_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Divergence)):
        raise TypeError(f"register_divergence: expected a Divergence subclass, got {cls!r}")


def register_divergence(name: str):
    """Class decorator adding a :class:`Divergence` subclass to the registry under ``name``, so that
    ``get_divergence(name, **params)`` and the config (``divergence.name``, ``divergence.params``)
    reach it — a new divergence is one class (f and f′ of log t) plus one YAML under fdiv_align/conf/divergence/
    (docs/design.md, "Adding a divergence")."""
    return _REGISTRY.register(name, check=_check_divergence_class)


def available_divergences() -> list[str]:
    """Names accepted by :func:`get_divergence`."""
    return _REGISTRY.names()


def get_divergence(name: str | Divergence, **kwargs) -> Divergence:
    """Look a divergence up by name (``get_divergence("alpha", alpha=0.5)``); objects pass through."""
    if isinstance(name, Divergence):
        if kwargs:
            raise ValueError(f"get_divergence: got a Divergence object and extra arguments {kwargs}")
        return name
    return _REGISTRY.build(name, **kwargs)


def f_divergence_terms(divergence: str | Divergence, log_pi: torch.Tensor, log_p: torch.Tensor,
                       log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Per-point terms of D_f(π‖p) = Σ_x p f(π/p), divided by q(x) when ``log_q`` is given (so that
    their mean over x ∼ q estimates D_f) and summed as they are otherwise (exact, over every x).

    Points with p = 0 contribute π·lim_{t→∞} f(t)/t (0·∞ = 0 when π is 0 there too); points with
    π = 0 < p contribute p·f(0). The one place this convention lives (exact values and IS estimates)."""
    div = get_divergence(divergence)
    log_w = log_pi if log_q is None else log_pi - log_q  # π (or π/q)
    log_v = log_p if log_q is None else log_p - log_q  # p (or p/q)
    target_zero = torch.isneginf(log_p)
    safe_log_t = torch.where(target_zero, torch.zeros_like(log_pi), log_pi - log_p)
    regular = torch.exp(log_v) * div.f(safe_log_t)
    w = torch.exp(log_w)
    slope = div.f_at_infinity_slope
    if math.isinf(slope):
        at_zero = torch.where(w > 0, torch.full_like(w, math.inf), torch.zeros_like(w))
    else:
        at_zero = w * slope
    return torch.where(target_zero, at_zero, regular)


def exact_divergence(divergence: str | Divergence, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Σ_x p(x) f(π(x)/p(x)) for two *normalised* distributions given as log-probabilities
    (:func:`f_divergence_terms` summed). Differentiable in ``log_pi``."""
    return f_divergence_terms(divergence, log_pi, log_p).sum()


def needs_floor(divergence: Divergence, log_scores: torch.Tensor, floor: float | None, what: str, option: str) -> bool:
    """Whether ``log_scores`` (log P or log Φ) must be floored for ``divergence``: True when the divergence
    is infinite where the target is 0 (rkl, chi2, alpha ≥ 1) and some score is −∞; then ``floor`` (the
    ``option`` the caller names) must be given, else a ValueError says so. The one check of the package."""
    zero = torch.isneginf(log_scores)
    if divergence.finite_where_target_is_zero or not zero.any():
        return False
    if floor is None:
        raise ValueError(f"divergence {divergence.name!r} is infinite where the target is 0, and {int(zero.sum())} "
                         f"sample(s) have {what} = -inf; pass {option} (e.g. -50.0) to treat them as a tiny target "
                         f"score, or use fkl/js/tv")
    return True


def floored_log_target(log_a: torch.Tensor, log_phi: torch.Tensor, floor: float | None) -> torch.Tensor:
    """log P_ε = log a + max(log Φ, floor): the target with the scorers' score floored relative to the base
    (P ≥ e^floor·a), the surrogate target for divergences infinite where P = 0 (``divergence.log_phi_floor``).
    An absolute floor on log P would rank a violating sequence above a satisfying one whenever log a < floor,
    as it is for most texts. ``floor=None``: log a + log Φ itself."""
    return log_a + (log_phi if floor is None else log_phi.clamp_min(float(floor)))

