"""Quasi-rejection sampling (QRS): samples of the target p = P/Z from a proposal q.

Eikema, Kruszewski, Dance, Elsahar, Dymetman (2022), "An approximate sampler for energy-based models
with divergence diagnostics". A proposal sample x ~ q is accepted with probability
min(1, P(x) / (β q(x))). Accepted samples follow

    p_β(x) = min(P(x), β q(x)) / Z_β,        Z_β = Σ_x min(P(x), β q(x)) = E_q[min(P/q, β)],

with acceptance rate A_β = Z_β / β, and their distance to p is bounded by

    TV(p, p_β) ≤ 1 − Z_β / Z                                    (Z = Σ_x P(x) = E_q[P/q]):

p_β ≥ min(P, βq)/Z because Z_β ≤ Z, so p − p_β ≤ (P − min(P, βq))/Z pointwise and summing the
positive part gives the bound. Once β ≥ max_x P(x)/q(x), p_β = p exactly (plain rejection sampling);
a larger β trades acceptance for accuracy. Z_β and Z are importance-sampling estimates from the
proposal's samples (:func:`qrs_estimates`); on an enumerable problem they are exact (:func:`qrs_exact`).

QRS needs q(x) > 0 wherever P(x) > 0: a proposal whose support misses p's (a top-k/top-p sampling
transform, a hard mask) never proposes those x, and no β reaches p. :func:`qrs_exact` checks it; for
sampled proposals the caller must not truncate the proposal (the trainer's evaluation refuses).

Conventions: all inputs are natural-log values (log P may be −∞; log q must be finite), float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["QRSEstimates", "QRSExact", "qrs_accept", "choose_log_beta", "qrs_estimates", "qrs_exact", "chi_square_pvalue"]


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check(log_P: torch.Tensor, log_q: torch.Tensor) -> None:
    if log_P.shape != log_q.shape or log_P.dim() != 1:
        raise ValueError(f"log_P and log_q must be 1-D of one length, got {tuple(log_P.shape)} and {tuple(log_q.shape)}")
    if torch.isnan(log_P).any() or (log_P == math.inf).any():
        raise ValueError("log_P contains NaN or +inf")
    if not torch.isfinite(log_q).all():
        raise ValueError("log_q must be finite: a proposal sample has q(x) > 0 (got NaN or ±inf)")


def qrs_accept(log_P, log_q, log_beta: float, uniforms) -> torch.Tensor:
    """[N] bool: accept x_i (drawn from q) iff u_i < min(1, P(x_i) / (β q(x_i))), u_i ~ U(0, 1)."""
    log_P, log_q, u = _as64(log_P), _as64(log_q), _as64(uniforms)
    _check(log_P, log_q)
    if not math.isfinite(log_beta):
        raise ValueError(f"log_beta must be finite, got {log_beta}")
    return torch.log(u) < (log_P - log_q - log_beta).clamp_max(0.0)


def choose_log_beta(log_P, log_q, quantile: float = 1.0) -> float:
    """log β as the ``quantile`` of the log-ratios log(P/q) of pilot proposal samples (1.0 = their
    maximum: no pilot sample is clipped). Lower quantiles accept more and clip more (larger TV bound)."""
    log_P, log_q = _as64(log_P), _as64(log_q)
    _check(log_P, log_q)
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    ratios = (log_P - log_q)[torch.isfinite(log_P)]
    if ratios.numel() == 0:
        raise ValueError("every pilot sample has P(x) = 0: no β can be chosen (the proposal misses the target)")
    return float(torch.quantile(ratios, quantile))


@dataclass
class QRSEstimates:
    """Importance-sampling estimates from N proposal samples (± one standard error)."""

    acceptance_rate: float  # E_q[min(1, P/(βq))]
    acceptance_rate_se: float
    log_z_beta: float  # log E_q[min(P/q, β)]
    log_z: float  # log E_q[P/q]
    tv_bound: float  # 1 − Z_β/Z (a ratio estimate: consistent, biased at small N)


def qrs_estimates(log_P, log_q, log_beta: float) -> QRSEstimates:
    """Acceptance rate, Z_β, Z and the TV bound of QRS at β, from samples x_i ~ q."""
    log_P, log_q = _as64(log_P), _as64(log_q)
    _check(log_P, log_q)
    n = log_P.numel()
    if not bool(torch.isfinite(log_P).any()):
        raise ValueError(f"every one of the {n} proposal samples has P(x) = 0: Z and the TV bound cannot be estimated "
                         f"(the proposal misses the target, or too few samples)")
    log_r = log_P - log_q
    accept = torch.exp((log_r - log_beta).clamp_max(0.0))  # min(1, r/β)
    se = float(accept.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    log_clipped = torch.minimum(log_r, torch.full_like(log_r, log_beta))  # log min(r, β)
    log_z_beta = float(torch.logsumexp(log_clipped, 0)) - math.log(n)
    log_z = float(torch.logsumexp(log_r, 0)) - math.log(n)
    return QRSEstimates(float(accept.mean()), se, log_z_beta, log_z, 1.0 - math.exp(log_z_beta - log_z))


@dataclass
class QRSExact:
    """QRS at β on an enumerated space: the accepted samples' distribution and its exact diagnostics."""

    log_p_beta: torch.Tensor  # [M] log p_β(x) for every x of the enumeration
    acceptance_rate: float  # Z_β / β
    tv_bound: float  # 1 − Z_β/Z
    tv: float  # TV(p, p_β), exact


def qrs_exact(log_P, log_q, log_beta: float) -> QRSExact:
    """p_β, the acceptance rate and TV(p, p_β) with its bound, given log P and log q of *every* sequence.
    Refuses a proposal whose support misses p's (q(x) = 0 where P(x) > 0)."""
    log_P, log_q = _as64(log_P), _as64(log_q)
    if log_P.shape != log_q.shape or log_P.dim() != 1:
        raise ValueError(f"log_P and log_q must be 1-D of one length, got {tuple(log_P.shape)} and {tuple(log_q.shape)}")
    missed = torch.isfinite(log_P) & torch.isneginf(log_q)
    if missed.any():
        raise ValueError(f"the proposal's support misses the target's: {int(missed.sum())} sequences have P(x) > 0 "
                         f"but q(x) = 0 (a truncated proposal: top-k/top-p or a mask); QRS cannot reach p")
    if torch.isnan(log_q).any() or torch.isnan(log_P).any():
        raise ValueError("log_P and log_q must not contain NaN")
    log_m = torch.minimum(log_P, log_q + log_beta)  # log min(P, βq)
    log_z_beta, log_z = torch.logsumexp(log_m, 0), torch.logsumexp(log_P, 0)
    if not torch.isfinite(log_z):
        raise ValueError("P(x) = 0 for every sequence: the target is empty")
    log_p_beta, log_p = log_m - log_z_beta, log_P - log_z
    tv = 0.5 * float((log_p_beta.exp() - log_p.exp()).abs().sum())
    return QRSExact(log_p_beta, math.exp(float(log_z_beta) - log_beta), 1.0 - math.exp(float(log_z_beta - log_z)), tv)


def chi_square_pvalue(counts, probs, min_expected: float = 5.0) -> float:
    """Pearson's goodness-of-fit p-value of ``counts`` [M] against probabilities ``probs`` [M] (an exact
    distribution, e.g. :attr:`QRSExact.log_p_beta` exponentiated), the cells with the smallest
    probabilities merged until each expects ≥ ``min_expected`` counts; P(χ²_df ≥ stat) from the regularised
    upper incomplete gamma function."""
    counts, probs = _as64(counts), _as64(probs)
    n = counts.sum()
    order = torch.argsort(probs)
    merged_c, merged_e, acc_c, acc_e = [], [], 0.0, 0.0
    for c, e in zip(counts[order].tolist(), (n * probs[order]).tolist()):
        acc_c, acc_e = acc_c + c, acc_e + e
        if acc_e >= min_expected:
            merged_c.append(acc_c)
            merged_e.append(acc_e)
            acc_c = acc_e = 0.0
    if len(merged_c) < 2:
        raise ValueError(f"fewer than two cells expect ≥ {min_expected} counts: too few samples for a chi-square test")
    merged_c[-1] += acc_c
    merged_e[-1] += acc_e
    c, e = torch.tensor(merged_c, dtype=torch.float64), torch.tensor(merged_e, dtype=torch.float64)
    stat = ((c - e) ** 2 / e).sum()
    df = torch.tensor((len(merged_c) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))
