"""The importance-sampled f-DPG surrogate loss (docs/math.md, "The estimator and the loss").

For samples x_i ∼ q with policy log-probs log π_i (carrying the graph), proposal log-probs
log q_i, target log-scores log P_i and log Z:

    log t_i = log π_i − log P_i + log Z          (t = π/p)
    w_i     = exp(log π_i − log q_i)             (detached; ≡ 1 on-policy)
    R_i     = −f′(t_i)                           (pseudo-reward)
    L       = −(1/N) Σ_i sg[w_i (R_i − B_i)] · log π_i

Contract: with the exact log Z and ``reduction="mean"``, E_q[∇θ L] = ∇θ D_f(πθ‖p) of
:mod:`fdiv_align.objectives.divergences`, constants included (any B_i independent of x_i keeps it exact
because E_q[w ∇log π] = 0).

Samples with log P = −∞: finite for ``fkl``, ``js``, ``tv``, ``alpha`` (α<1). For ``rkl``,
``chi2`` and ``alpha`` (α≥1) the pseudo-reward is −∞ there: pass ``log_p_floor`` (log P is then
replaced by max(log P, floor) — a documented, biased surrogate that treats P = 0 as a tiny
P = e^floor) or the call raises (:func:`~fdiv_align.objectives.divergences.needs_floor`). The trainer and
the TRL integration, which see log a and log Φ apart, floor Φ instead — relative to the base,
:func:`~fdiv_align.objectives.divergences.floored_log_target` — and pass finite log P here.

All coefficients are computed in float64; if one still overflows (|log ratios| beyond ~700) the call
raises instead of letting ±∞/NaN into the grads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .divergences import Divergence, get_divergence, needs_floor
from .estimators import Baseline, LogZAccumulator, effective_sample_size, get_baseline

__all__ = ["FDPGLossOutput", "f_dpg_loss", "FDivergenceLoss"]


@dataclass
class FDPGLossOutput:
    """Result of :func:`f_dpg_loss`. Everything but ``loss`` is detached (float64)."""

    loss: torch.Tensor
    pseudo_rewards: torch.Tensor  # R_i = −f′(t_i)
    advantages: torch.Tensor  # R_i − B_i
    baselines: torch.Tensor  # B_i
    importance_weights: torch.Tensor  # w_i = π_i/q_i
    coefficients: torch.Tensor  # w_i (R_i − B_i), the detached factor of −log π_i
    log_ratio: torch.Tensor  # log t_i = log π_i − log p_i
    ess: torch.Tensor  # (Σw)²/Σw²
    skipped: torch.Tensor | None = None  # FDivergenceLoss: samples whose context Z is unknown (coefficient 0)


def _check_vector(name: str, x, n: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected shape [N], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty batch (N = 0); f_dpg_loss needs at least one sample")
    if n is not None and x.numel() != n:
        raise ValueError(f"{name}: expected {n} values like policy_logprobs, got {x.numel()}")
    if torch.isnan(x).any():
        raise ValueError(f"{name}: contains NaN at indices {torch.nonzero(torch.isnan(x)).flatten().tolist()[:10]}")
    return x


def _checked_log_values(log_pi_graph, proposal_logprobs, target_logscores, log_z):
    """(log π, log q, log P, log Z) as detached float64 [N] vectors, or a ValueError naming the bad input."""
    n = log_pi_graph.numel()
    log_q = _check_vector("proposal_logprobs", proposal_logprobs, n).detach().to(torch.float64)
    log_P = _check_vector("target_logscores", target_logscores, n).detach().to(torch.float64)
    log_pi = log_pi_graph.detach().to(torch.float64)
    if not torch.isfinite(log_pi).all():
        raise ValueError("policy_logprobs: must be finite (a sample the policy gives probability 0?)")
    if not torch.isfinite(log_q).all():
        raise ValueError("proposal_logprobs: must be finite (q must have produced every sample)")
    if torch.isposinf(log_P).any():
        raise ValueError("target_logscores: +inf is not a valid log-score")
    log_z = torch.as_tensor(log_z, dtype=torch.float64, device=log_pi.device).detach() if not torch.is_tensor(log_z) \
        else log_z.detach().to(log_pi.device, torch.float64)
    if log_z.dim() > 1 or (log_z.dim() == 1 and log_z.numel() != n):
        raise ValueError(f"log_z: expected a scalar or shape [{n}], got {tuple(log_z.shape)}")
    if not torch.isfinite(log_z).all():
        raise ValueError(f"log_z must be finite, got {log_z.flatten()[:5].tolist()} (Z unknown? skip that context)")
    return log_pi, log_q, log_P, log_z.expand(n)


def f_dpg_loss(
    policy_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor,
    target_logscores: torch.Tensor,
    divergence: str | Divergence,
    log_z,
    baseline=None,
    reduction: str = "mean",
    context_ids=None,
    log_p_floor: float | None = None,
) -> FDPGLossOutput:
    """f-DPG surrogate loss whose expected gradient is ∇θ D_f(πθ‖p) (see module docstring).

    Args:
        policy_logprobs: [N] log πθ(x_i|c_i), with grad.
        proposal_logprobs: [N] log q(x_i|c_i) (on-policy: ``policy_logprobs.detach()``).
        target_logscores: [N] log P(x_i|c_i), −∞ allowed.
        divergence: a name (``"js"``) or a :class:`~fdiv_align.objectives.divergences.Divergence`.
        log_z: scalar or [N] log Z of each sample's context.
        baseline: None (B = 0), a number or [N] tensor of B_i, or a
            :class:`~fdiv_align.objectives.estimators.Baseline` (called, then updated with this batch).
        reduction: ``"mean"`` (the contract), ``"sum"`` or ``"none"`` (per-sample terms).
        context_ids: [N] integer context ids (for the leave-one-out baseline).
        log_p_floor: floor on log P for divergences infinite where P = 0 (``rkl``, ``chi2``).
    """
    div = get_divergence(divergence)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    log_pi_graph = _check_vector("policy_logprobs", policy_logprobs)
    n = log_pi_graph.numel()
    log_pi, log_q, log_P, log_z = _checked_log_values(log_pi_graph, proposal_logprobs, target_logscores, log_z)
    if needs_floor(div, log_P, log_p_floor, "log P", "log_p_floor"):
        log_P = log_P.clamp_min(float(log_p_floor))

    log_t = log_pi - log_P + log_z
    log_w = log_pi - log_q
    rewards = div.pseudo_reward(log_t)
    weights = torch.exp(log_w)
    weighted_rewards = div.weighted_pseudo_reward(log_w, log_t)

    if baseline is None:
        base = torch.zeros_like(rewards)
    elif isinstance(baseline, Baseline):
        base = baseline(rewards, weights, context_ids).to(torch.float64)
    else:
        base = torch.as_tensor(baseline, dtype=torch.float64, device=rewards.device).expand(n)
    coefficients = weighted_rewards - weights * base
    if not torch.isfinite(coefficients).all():
        bad = torch.nonzero(~torch.isfinite(coefficients)).flatten()[:10].tolist()
        raise FloatingPointError(
            f"f_dpg_loss({div.name}): non-finite coefficient w·(R−B) for samples {bad} "
            f"(log t = {log_t[bad].tolist()}, log w = {log_w[bad].tolist()}); the exact value overflows float64"
        )
    if isinstance(baseline, Baseline):
        baseline.update(rewards, weights, context_ids)

    per_sample = -coefficients.to(log_pi_graph.dtype) * log_pi_graph
    if reduction == "mean":
        loss = per_sample.mean()
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample
    return FDPGLossOutput(
        loss=loss,
        pseudo_rewards=rewards,
        advantages=rewards - base,
        baselines=base,
        importance_weights=weights,
        coefficients=coefficients,
        log_ratio=log_t,
        ess=effective_sample_size(log_w),
    )


class FDivergenceLoss(nn.Module):
    """Stateful f-DPG loss: owns a per-context :class:`LogZAccumulator` and a baseline.

    ``forward(policy_logprobs, proposal_logprobs, target_logscores, context_ids=None)`` first adds
    the batch to Ẑ, then computes :func:`f_dpg_loss` with the updated per-context log Ẑ. Samples
    whose context still has an unknown Z (every P so far 0) get coefficient 0 (no update), are
    marked in ``out.skipped`` and counted in :attr:`skipped_samples`; the loss stays the mean over
    all N samples (so that it is differentiable and 0 when nothing is known).

    ``logratio_resolution`` δ (nats; None = off): how far apart two computations of the same log-ratio
    may be (e.g. log q recorded while sampling and log a rescored by another kernel). An advantage
    R_i − B_i no larger than what a δ error in the log-ratios could produce — |ΔR_i| + max_j |ΔR_j|
    with ΔR = R(log t ± δ) − R(log t) — is numerical noise, and its coefficient is set to exactly 0.
    Without it, a policy already equal to its target (p = a under a constant reward) gets ~1e-5 noise
    gradients that Adam rescales into full-size steps in random directions.
    """

    def __init__(self, divergence: str | Divergence = "js", baseline: str | Baseline | None = None,
                 log_p_floor: float | None = None, num_contexts: int = 1, logratio_resolution: float | None = None,
                 **baseline_kwargs):
        super().__init__()
        if logratio_resolution is not None and not (logratio_resolution >= 0 and math.isfinite(logratio_resolution)):
            raise ValueError(f"logratio_resolution must be None or a finite number ≥ 0, got {logratio_resolution!r}")
        self.logratio_resolution = logratio_resolution
        self.divergence = get_divergence(divergence)
        self.baseline = get_baseline(baseline, divergence=self.divergence, **baseline_kwargs)
        self.log_p_floor = log_p_floor
        self.log_z = LogZAccumulator(num_contexts)
        self.skipped_samples = 0

    def forward(self, policy_logprobs, proposal_logprobs, target_logscores, context_ids=None) -> FDPGLossOutput:
        out = self._forward(policy_logprobs, proposal_logprobs, target_logscores, context_ids)
        if self.logratio_resolution:
            self._zero_below_resolution(out, policy_logprobs)
        return out

    def _zero_below_resolution(self, out: FDPGLossOutput, policy_logprobs: torch.Tensor) -> None:
        live = ~out.skipped
        if not live.any():
            return
        delta, lt, R = self.logratio_resolution, out.log_ratio, out.pseudo_rewards
        with torch.no_grad():
            dR = torch.maximum((self.divergence.pseudo_reward(lt + delta) - R).abs(),
                               (self.divergence.pseudo_reward(lt - delta) - R).abs())
            noise = dR + dR[live].max()
            noise_only = live & (out.advantages.abs() <= noise)
        if noise_only.any():
            out.coefficients = torch.where(noise_only, torch.zeros_like(out.coefficients), out.coefficients)
            out.loss = -(out.coefficients.to(policy_logprobs.dtype) * policy_logprobs).mean()

    def _forward(self, policy_logprobs, proposal_logprobs, target_logscores, context_ids=None) -> FDPGLossOutput:
        self.log_z.update(target_logscores, proposal_logprobs, context_ids)
        n = policy_logprobs.numel()
        device = policy_logprobs.device
        log_z, known = self.log_z.log_z(context_ids, n=n)
        log_z, known = log_z.to(device), known.to(device)
        if known.all():
            out = f_dpg_loss(policy_logprobs, proposal_logprobs, target_logscores, self.divergence, log_z,
                             self.baseline, "mean", context_ids, self.log_p_floor)
            out.skipped = torch.zeros(n, dtype=torch.bool, device=device)
            return out
        self.skipped_samples += int((~known).sum())
        full = lambda: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        out = FDPGLossOutput((policy_logprobs * 0.0).sum(), full(), full(), full(), full(), full(), full(),
                             torch.tensor(0.0, dtype=torch.float64), skipped=~known)
        if known.any():
            keep = known.nonzero().flatten()
            ctx = None if context_ids is None else torch.as_tensor(context_ids, device=device)[keep]
            sub = f_dpg_loss(policy_logprobs[keep], proposal_logprobs[keep], target_logscores[keep], self.divergence,
                             log_z[keep], self.baseline, "sum", ctx, self.log_p_floor)
            out.loss = sub.loss / n
            for name in ("pseudo_rewards", "advantages", "baselines", "importance_weights", "coefficients", "log_ratio"):
                getattr(out, name)[keep] = getattr(sub, name)
            out.ess = sub.ess
        return out

    def state_dict_extra(self) -> dict:
        """Non-parameter state for checkpoints: Z accumulator, baseline, counters."""
        return {"log_z": self.log_z.state_dict(), "baseline": self.baseline.state_dict(), "skipped_samples": self.skipped_samples}

    def load_state_dict_extra(self, state: dict) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.baseline.load_state_dict(state["baseline"])
        self.skipped_samples = int(state["skipped_samples"])
