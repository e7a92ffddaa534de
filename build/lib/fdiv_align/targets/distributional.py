"""Distributional constraints (docs/user_guide.md, "Targets"): P(x) = a(x)·exp(λ·φ(x)) with E_p[φ] = μ̄.

λ minimises the convex dual  g(λ) = log Σ_j (a(x_j)/q(x_j)) e^{λ·φ_j} − λ·μ̄  on samples of q.
∇g = E_w[φ] − μ̄ and ∇²g = Cov_w[φ] with self-normalised weights w_j ∝ (a_j/q_j) e^{λ·φ_j}; we use
damped Newton with a backtracking line search until ‖∇g‖∞ ≤ tol. A finite minimiser exists iff
μ̄ lies in the relative interior of the convex hull of the sampled φ; outside it we refuse with
a clear error (per-feature range check first, then non-convergence of a divergent λ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .scorers import Scorer, ScorerError

__all__ = ["DualFit", "fit_lambda", "DistributionalConstraint", "InfeasibleConstraintError"]


class InfeasibleConstraintError(ValueError):
    """μ̄ is outside the convex hull of the sampled features: no finite λ exists."""


@dataclass
class DualFit:
    lambdas: torch.Tensor  # [K]
    achieved: torch.Tensor  # [K] E_w[φ] at the solution (self-normalised IS on the fit samples)
    targets: torch.Tensor  # [K] μ̄
    iterations: int
    ess: float  # effective sample size of the final weights
    grad_norm: float


# Damped Newton on the dual (fp64):
NEWTON_RIDGE = 1e-12  # added to the diagonal of Cov_w[φ] (singular when a feature is constant on the samples)
ARMIJO_FRACTION = 1e-4  # sufficient decrease: g(λ + t·s) ≤ g(λ) + ARMIJO_FRACTION·t·∇g·s
MIN_STEP_FRACTION = 1e-10  # the line search takes this fraction of the step rather than halving forever
DIVERGENT_LAMBDA = 1e6  # |λ| beyond this: the fit is running off to infinity (μ̄ on the hull's boundary)
ACCEPTED_GRADIENT = 1e-6  # ‖∇g‖∞ accepted after max_iter when the requested tol was tighter


def _dual(lam, phi, log_v, mu):
    s = log_v + phi @ lam
    lse = torch.logsumexp(s, 0)
    w = torch.exp(s - lse)
    mean = w @ phi
    centred = phi - mean
    cov = (centred * w[:, None]).T @ centred
    return lse - lam @ mu, mean - mu, cov, w


def fit_lambda(phi: torch.Tensor, targets: Sequence[float], log_a: torch.Tensor | None = None,
               log_q: torch.Tensor | None = None, tol: float = 1e-9, max_iter: int = 100) -> DualFit:
    """Solve the dual for λ on samples x_j ∼ q with features φ [N, K] (and log a, log q; q = a if omitted)."""
    phi = torch.as_tensor(phi, dtype=torch.float64)
    if phi.dim() == 1:
        phi = phi[:, None]
    n, k = phi.shape
    mu = torch.as_tensor(targets, dtype=torch.float64).flatten()
    if mu.numel() != k:
        raise ValueError(f"{k} features but {mu.numel()} target moments")
    if not torch.isfinite(phi).all():
        raise ValueError("features contain NaN or inf")
    log_v = torch.zeros(n, dtype=torch.float64)
    if log_a is not None:
        log_v = log_v + torch.as_tensor(log_a, dtype=torch.float64)
    if log_q is not None:
        log_v = log_v - torch.as_tensor(log_q, dtype=torch.float64)
    lo, hi = phi.min(0).values, phi.max(0).values
    for j in range(k):
        if not (lo[j] < mu[j] < hi[j]):
            raise InfeasibleConstraintError(
                f"target moment μ̄[{j}] = {float(mu[j])} is outside the open range ({float(lo[j])}, {float(hi[j])}) "
                f"of feature {j} over the {n} samples: no finite λ reaches it (sample more, or change μ̄)")
    lam = torch.zeros(k, dtype=torch.float64)
    value, grad, cov, w = _dual(lam, phi, log_v, mu)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - ``it`` is reported after the loop
        if float(grad.abs().max()) <= tol:
            break
        step = torch.linalg.lstsq(cov + NEWTON_RIDGE * torch.eye(k, dtype=torch.float64), -grad[:, None]).solution.flatten()
        t = 1.0
        while True:
            new = lam + t * step
            nv, ng, nc, nw = _dual(new, phi, log_v, mu)
            if nv <= value + ARMIJO_FRACTION * t * float(grad @ step) or t < MIN_STEP_FRACTION:
                break
            t *= 0.5
        lam, value, grad, cov, w = new, nv, ng, nc, nw
        if not torch.isfinite(lam).all() or float(lam.abs().max()) > DIVERGENT_LAMBDA:
            break
    gnorm = float(grad.abs().max())
    if gnorm > max(tol, ACCEPTED_GRADIENT):
        raise InfeasibleConstraintError(
            f"λ fit did not converge (‖∇‖∞ = {gnorm:.3g} after {it} Newton steps, λ = {lam.tolist()}): μ̄ = {mu.tolist()} "
            f"is (numerically) outside the convex hull of the sampled features")
    ess = float(1.0 / (w**2).sum())
    return DualFit(lam, w @ phi, mu, it, ess, gnorm)


class DistributionalConstraint(Scorer):
    """Exponential scorer exp(λ·φ(x, c)) whose λ is fitted so that E_p[φ] = μ̄.

    ``features``: callables ``f(texts, contexts) -> [N] floats``. Until :meth:`fit` is called the
    scorer refuses to score (λ unknown).
    """

    def __init__(self, features: Sequence[Callable], targets: Sequence[float], names: Sequence[str] | None = None,
                 name: str = "distributional"):
        self.features = list(features)
        self.targets = [float(t) for t in targets]
        if len(self.features) != len(self.targets):
            raise ValueError(f"{len(self.features)} features but {len(self.targets)} targets")
        self.feature_names = list(names) if names else [f"phi{i}" for i in range(len(self.features))]
        self.name = name
        self.lambdas: torch.Tensor | None = None
        self.last_fit: DualFit | None = None

    def feature_values(self, texts, contexts) -> torch.Tensor:
        cols = []
        for f, fname in zip(self.features, self.feature_names):
            v = torch.as_tensor(f(list(texts), list(contexts)), dtype=torch.float64).flatten()
            if v.numel() != len(texts) or not torch.isfinite(v).all():
                bad = (~torch.isfinite(v)).nonzero()
                i = int(bad[0]) if len(bad) else 0
                raise ScorerError(f"feature {fname!r} of {self.name!r} returned an invalid value for text {texts[i][:120]!r}")
            cols.append(v)
        return torch.stack(cols, 1)

    def fit(self, texts, contexts, log_a=None, log_q=None, **kwargs) -> DualFit:
        fit = fit_lambda(self.feature_values(texts, contexts), self.targets, log_a, log_q, **kwargs)
        self.lambdas, self.last_fit = fit.lambdas, fit
        return fit

    def _log_scores(self, texts, contexts):
        if self.lambdas is None:
            raise ScorerError(f"distributional constraint {self.name!r}: λ not fitted yet (call fit on proposal samples)")
        return self.feature_values(texts, contexts) @ self.lambdas

    def alignment(self, texts, contexts):
        return self.feature_values(texts, contexts)[:, 0]

    def state_dict(self) -> dict:
        return {"lambdas": None if self.lambdas is None else self.lambdas.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.lambdas = state["lambdas"]
