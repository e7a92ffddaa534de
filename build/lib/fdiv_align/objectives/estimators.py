"""Importance-sampling estimators (docs/math.md, "The estimator and the loss", "Estimates reported during training"), all in log space.

Notation: samples x ∼ q (the proposal), log π = policy log-prob, log P = unnormalised target
log-score (−∞ allowed), log Ẑ = estimated log partition function, p = P/Z.

* :class:`LogZAccumulator` — per-context Ẑ_c = mean_j P(x_j|c)/q(x_j|c), accumulated across steps
  as a log-sum-exp and a count (each term is unbiased whatever q produced it).
* :func:`effective_sample_size` — (Σw)²/Σw².
* :func:`estimate_divergences` — IS estimates of KL(p‖π), KL(π‖p), JS, TV, alignment, KL(π‖a),
  each with its standard error (sample std of the per-sample terms / √N).
* Baselines B for the pseudo-reward (none, moving average, constant, leave-one-out).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import Registry
from .divergences import LOG2, f_divergence_terms, get_divergence

__all__ = [
    "LogZAccumulator",
    "Estimate",
    "effective_sample_size",
    "estimate_divergences",
    "estimate_f_divergence",
    "add_trained_divergence",
    "Baseline",
    "NoBaseline",
    "MovingAverageBaseline",
    "ConstantBaseline",
    "LeaveOneOutBaseline",
    "get_baseline",
]


def _as_1d(name: str, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [N], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty batch (N = 0); at least one sample is needed")
    return x


def _group_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """log Σ_{i: index_i = c} exp(values_i) for c < size; −∞ for empty groups or all −∞."""
    vmax = torch.full((size,), -math.inf, dtype=values.dtype, device=values.device)
    vmax = vmax.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    safe_max = torch.where(torch.isfinite(vmax), vmax, torch.zeros_like(vmax))
    sums = torch.zeros(size, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, torch.exp(values - safe_max[index]))
    return torch.log(sums) + safe_max


class LogZAccumulator:
    """Per-context running importance-sampling estimate of log Z_c.

    Ẑ_c = (1/n_c) Σ_j P(x_j|c)/q(x_j|c) over every sample ever seen for context c; kept as
    ``log_sum[c] = log Σ_j P/q`` and ``count[c] = n_c``. Contexts are integer ids 0..C−1 (the
    container grows as new ids appear). A context whose samples all had P = 0 has an unknown Z:
    :meth:`log_z` reports it in its ``known`` mask and :attr:`unknown_warnings` counts the batches
    that hit it. Samples with P = 0 still count in n_c: they are legitimate zero terms of the
    unbiased mean (dropping them would bias Ẑ upwards). Mergeable across processes
    (:meth:`merge`) and checkpointable (:meth:`state_dict`).
    """

    def __init__(self, num_contexts: int = 1, dtype: torch.dtype = torch.float64):
        if num_contexts < 1:
            raise ValueError(f"LogZAccumulator: num_contexts must be ≥ 1, got {num_contexts}")
        self.dtype = dtype
        self.log_sum = torch.full((num_contexts,), -math.inf, dtype=dtype)
        self.count = torch.zeros(num_contexts, dtype=torch.long)
        self.unknown_warnings = 0

    @property
    def num_contexts(self) -> int:
        return self.log_sum.numel()

    def _grow(self, size: int) -> None:
        if size > self.num_contexts:
            extra = size - self.num_contexts
            self.log_sum = torch.cat([self.log_sum, torch.full((extra,), -math.inf, dtype=self.dtype)])
            self.count = torch.cat([self.count, torch.zeros(extra, dtype=torch.long)])

    def _context_index(self, context_ids, n: int) -> torch.Tensor:
        if context_ids is None:
            return torch.zeros(n, dtype=torch.long)
        idx = torch.as_tensor(context_ids).to(device="cpu", dtype=torch.long)
        if idx.shape != (n,):
            raise ValueError(f"context_ids: expected shape ({n},), got {tuple(idx.shape)}")
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"context_ids must be non-negative integers, got min {int(idx.min())}")
        return idx

    def update(self, target_logscores, proposal_logprobs, context_ids=None) -> None:
        """Add the terms P(x_j|c)/q(x_j|c) of one batch."""
        log_p = _as_1d("target_logscores", target_logscores).detach().to("cpu", self.dtype)
        log_q = _as_1d("proposal_logprobs", proposal_logprobs).detach().to("cpu", self.dtype)
        if log_p.shape != log_q.shape:
            raise ValueError(f"target_logscores {tuple(log_p.shape)} and proposal_logprobs {tuple(log_q.shape)} differ")
        if torch.isnan(log_p).any() or torch.isnan(log_q).any() or torch.isposinf(log_p).any():
            raise ValueError("LogZAccumulator.update: NaN or +inf in target_logscores / proposal_logprobs")
        if not torch.isfinite(log_q).all():
            raise ValueError("LogZAccumulator.update: proposal log-probability −inf (a sample q could not produce)")
        idx = self._context_index(context_ids, log_p.numel())
        size = int(idx.max()) + 1
        self._grow(size)
        batch = _group_logsumexp(log_p - log_q, idx, self.num_contexts)
        self.log_sum = torch.logaddexp(self.log_sum, batch)
        self.count = self.count + torch.bincount(idx, minlength=self.num_contexts)
        seen = torch.zeros(self.num_contexts, dtype=torch.bool)
        seen[idx] = True
        n_unknown = int((seen & torch.isneginf(self.log_sum)).sum())
        if n_unknown:
            self.unknown_warnings += n_unknown
            warnings.warn(
                f"log Z unknown for {n_unknown} context(s): every sample so far has P = 0 "
                f"(total such warnings: {self.unknown_warnings}); their updates are skipped",
                RuntimeWarning,
                stacklevel=2,
            )

    def log_z(self, context_ids=None, n: int | None = None):
        """(log Ẑ per requested context, known mask). With ``context_ids=None``: context 0, shape [n or 1]."""
        if context_ids is None:
            idx = torch.zeros(n or 1, dtype=torch.long)
        else:
            idx = self._context_index(context_ids, len(context_ids))
            self._grow(int(idx.max()) + 1 if idx.numel() else 0)
        count = self.count[idx].to(self.dtype)
        known = torch.isfinite(self.log_sum[idx]) & (count > 0)
        value = torch.where(known, self.log_sum[idx] - torch.log(count.clamp_min(1)), torch.full_like(count, -math.inf))
        return value, known

    def merge(self, other: "LogZAccumulator") -> "LogZAccumulator":
        """Combine the terms of another accumulator (e.g. another process) into this one."""
        self._grow(other.num_contexts)
        other_sum = torch.full((self.num_contexts,), -math.inf, dtype=self.dtype)
        other_cnt = torch.zeros(self.num_contexts, dtype=torch.long)
        other_sum[: other.num_contexts] = other.log_sum.to(self.dtype)
        other_cnt[: other.num_contexts] = other.count
        self.log_sum = torch.logaddexp(self.log_sum, other_sum)
        self.count = self.count + other_cnt
        self.unknown_warnings += other.unknown_warnings
        return self

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum.clone(), "count": self.count.clone(), "unknown_warnings": self.unknown_warnings}

    def load_state_dict(self, state: dict) -> None:
        missing = {"log_sum", "count"} - set(state)
        if missing:
            raise KeyError(f"LogZAccumulator.load_state_dict: missing keys {sorted(missing)}")
        self.log_sum = state["log_sum"].clone().to(self.dtype)
        self.count = state["count"].clone().to(torch.long)
        self.unknown_warnings = int(state.get("unknown_warnings", 0))


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """(Σw)²/Σw² from log w, in log space (N when all weights are equal)."""
    lw = _as_1d("log_weights", log_weights).detach().to(torch.float64)
    return torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo estimate (mean of per-sample terms) and its standard error."""

    value: float
    stderr: float

    @staticmethod
    def of_terms(terms: torch.Tensor) -> "Estimate":
        n = terms.numel()
        value = terms.mean()
        if not torch.isfinite(value):
            return Estimate(float(value), math.nan)
        se = terms.std(unbiased=True) / math.sqrt(n) if n > 1 else torch.tensor(math.nan)
        return Estimate(float(value), float(se))


def _xlogy_terms(log_weight: torch.Tensor, log_value: torch.Tensor) -> torch.Tensor:
    """exp(log_weight)·log_value with the convention 0·(±∞) = 0."""
    w = torch.exp(log_weight)
    return torch.where(w > 0, w * log_value, torch.zeros_like(w))


def estimate_divergences(
    policy_logprobs,
    proposal_logprobs,
    target_logscores,
    log_z,
    base_logprobs=None,
    alignment_scores=None,
) -> dict[str, Estimate]:
    """IS estimates from samples of q (docs/math.md, "Estimates reported during training"); each an :class:`Estimate` (value, stderr).

    Returns ``kl_p_pi`` = KL(p‖π) = E_q[(P/(Ẑq))(log P − log Ẑ − log π)] (P = 0 terms are 0),
    ``kl_pi_p`` = KL(π‖p) = E_q[(π/q)(log π − log P + log Ẑ)] (∞ if π/q > 0 where P = 0),
    ``js`` = ½E_q[(π/q) log(2π/(π+p))] + ½E_q[(p/q) log(2p/(π+p))], ``tv`` = ½E_q|π/q − p/q|,
    ``z`` = mean P/q (the batch's own Ẑ), and when given, ``alignment`` = E_q[(π/q)·b] and
    ``kl_pi_a`` = E_q[(π/q)(log π − log a)]. ``log_z`` is a scalar or per-sample [N].
    """
    log_pi = _as_1d("policy_logprobs", policy_logprobs).detach().to(torch.float64)
    log_q = _as_1d("proposal_logprobs", proposal_logprobs).detach().to(torch.float64)
    log_P = _as_1d("target_logscores", target_logscores).detach().to(torch.float64)
    if not (log_pi.shape == log_q.shape == log_P.shape):
        raise ValueError(f"shapes differ: policy {tuple(log_pi.shape)}, proposal {tuple(log_q.shape)}, target {tuple(log_P.shape)}")
    log_z = torch.as_tensor(log_z, dtype=torch.float64).detach().cpu() if not torch.is_tensor(log_z) else log_z.detach().to(torch.float64)
    log_z = log_z.to(log_pi.device).expand_as(log_pi)
    log_p = log_P - log_z  # normalised target log-prob
    log_w = log_pi - log_q  # π/q
    log_v = log_p - log_q  # p/q
    log_t = log_pi - log_p
    out = {
        "kl_p_pi": Estimate.of_terms(_xlogy_terms(log_v, log_p - log_pi)),
        "kl_pi_p": Estimate.of_terms(_xlogy_terms(log_w, log_t)),
        "js": Estimate.of_terms(
            0.5 * _xlogy_terms(log_w, LOG2 - F.softplus(-log_t)) + 0.5 * _xlogy_terms(log_v, LOG2 - F.softplus(log_t))
        ),
        "tv": Estimate.of_terms(0.5 * torch.abs(torch.exp(log_w) - torch.exp(log_v))),
        "z": Estimate.of_terms(torch.exp(log_P - log_q)),
    }
    if alignment_scores is not None:
        b = torch.as_tensor(alignment_scores).detach().to(log_pi.device, torch.float64)
        out["alignment"] = Estimate.of_terms(torch.exp(log_w) * b)
    if base_logprobs is not None:
        log_a = _as_1d("base_logprobs", base_logprobs).detach().to(torch.float64)
        out["kl_pi_a"] = Estimate.of_terms(_xlogy_terms(log_w, log_pi - log_a))
    return out


def estimate_f_divergence(divergence, policy_logprobs, proposal_logprobs, target_logscores, log_z) -> Estimate:
    """IS estimate of D_f(π‖p) = E_p[f(π/p)] from samples of q for *any* divergence, from its ``f``
    alone (:func:`fdiv_align.objectives.divergences.f_divergence_terms`), so a newly registered divergence is
    reported too."""
    log_pi = _as_1d("policy_logprobs", policy_logprobs).detach().to(torch.float64)
    log_q = _as_1d("proposal_logprobs", proposal_logprobs).detach().to(torch.float64)
    log_P = _as_1d("target_logscores", target_logscores).detach().to(torch.float64)
    log_z = torch.as_tensor(log_z, dtype=torch.float64).to(log_pi.device).expand_as(log_pi)
    return Estimate.of_terms(f_divergence_terms(divergence, log_pi, log_P - log_z, log_q))


#: the built-in divergences whose estimate :func:`estimate_divergences` already reports, by key
REPORTED_KEYS = {"fkl": "kl_p_pi", "rkl": "kl_pi_p", "js": "js", "tv": "tv"}


def add_trained_divergence(est: dict, divergence, policy_logprobs, proposal_logprobs, target_logscores, log_z) -> dict:
    """``est["train_divergence"]``: the estimate of the divergence being trained — the one already in
    ``est`` for fkl/rkl/js/tv (not computed twice), else :func:`estimate_f_divergence`."""
    div = get_divergence(divergence)
    key = REPORTED_KEYS.get(div.name)
    est["train_divergence"] = est[key] if key in est else estimate_f_divergence(
        div, policy_logprobs, proposal_logprobs, target_logscores, log_z)
    return est


# ----------------------------------------------------------------------------- baselines


class Baseline:
    """B_i subtracted from the pseudo-reward R_i. Must not depend on sample i (unbiasedness).

    ``__call__(rewards, weights, context_ids)`` returns B [N] for the current batch using only
    state from earlier batches or other samples; ``update`` then absorbs the current batch.
    """

    name = "abstract"

    def __call__(self, rewards: torch.Tensor, weights: torch.Tensor, context_ids=None) -> torch.Tensor:
        raise NotImplementedError

    def update(self, rewards: torch.Tensor, weights: torch.Tensor, context_ids=None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoBaseline(Baseline):
    name = "none"

    def __call__(self, rewards, weights, context_ids=None):
        return torch.zeros_like(rewards)


class ConstantBaseline(Baseline):
    """A fixed B. For ``fkl`` the exact value is 1, since E_π[p/π] = 1."""

    name = "constant"

    def __init__(self, value: float = 1.0):
        self.value = float(value)

    def __call__(self, rewards, weights, context_ids=None):
        return torch.full_like(rewards, self.value)


class MovingAverageBaseline(Baseline):
    """B = exponential moving average of earlier batches' IS mean E_q[w·R] (0 before the first)."""

    name = "moving_average"

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MovingAverageBaseline: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.value: float | None = None

    def __call__(self, rewards, weights, context_ids=None):
        return torch.full_like(rewards, 0.0 if self.value is None else self.value)

    def update(self, rewards, weights, context_ids=None):
        batch = float((weights * rewards).mean())
        if not math.isfinite(batch):
            return
        self.value = batch if self.value is None else self.momentum * self.value + (1 - self.momentum) * batch

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class LeaveOneOutBaseline(Baseline):
    """B_i = mean of w_j·R_j over the *other* samples j of the same context (0 if alone)."""

    name = "loo"

    def __call__(self, rewards, weights, context_ids=None):
        n = rewards.numel()
        idx = torch.zeros(n, dtype=torch.long, device=rewards.device) if context_ids is None \
            else torch.as_tensor(context_ids, device=rewards.device).long()
        size = int(idx.max()) + 1
        wr = weights * rewards
        sums = torch.zeros(size, dtype=wr.dtype, device=wr.device).index_add(0, idx, wr)
        counts = torch.zeros(size, dtype=wr.dtype, device=wr.device).index_add(0, idx, torch.ones_like(wr))
        others = counts[idx] - 1
        return torch.where(others > 0, (sums[idx] - wr) / others.clamp_min(1), torch.zeros_like(wr))


_BASELINES = Registry("baseline", {"none": NoBaseline, "moving_average": MovingAverageBaseline, "constant": ConstantBaseline,
                                   "loo": LeaveOneOutBaseline})


def get_baseline(name: str | Baseline | None, divergence=None, **kwargs) -> Baseline:
    """``none``, ``moving_average`` (momentum=…), ``constant`` (value=…; for ``fkl`` default 1),
    ``loo`` — or a :class:`Baseline` object."""
    if name is None:
        return NoBaseline()
    if isinstance(name, Baseline):
        return name
    if name == "constant" and "value" not in kwargs:
        div_name = getattr(divergence, "name", divergence)
        if div_name != "fkl":
            raise ValueError(
                f"baseline 'constant' needs value=…; only for 'fkl' is the exact constant (1) known, got divergence {div_name!r}"
            )
        kwargs["value"] = 1.0
    return _BASELINES.build(name, **kwargs)
