"""Evaluation on a fixed sample, and the fit of distributional constraints, for the trainer.

The evaluation sample is the same every time — contexts ``arange(M) mod C`` and uniforms from
``trainer.eval_seed`` — drawn from the current policy, so evaluations differ only by the policy.
Reported: alignment (mean ± s.e.), KL(π‖a) (mean of log π − log a ± s.e.), entropy, distinct-n,
Self-BLEU-3, and — once every context's Z is known — the IS estimates of KL(p‖π), KL(π‖p), JS, TV and
the trained divergence (``train_divergence``, from its f) with q = π and the trainer's current Ẑ (each
with its standard error), and the target p itself (:func:`target_p_record`): IS estimates of its
alignment, entropy and KL(p‖a), and quasi-rejection samples of p (fdiv_align/objectives/qrs.py) with their
acceptance rate and TV bound.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..objectives.estimators import LogZAccumulator, add_trained_divergence, estimate_divergences
from ..objectives.qrs import choose_log_beta, qrs_accept, qrs_estimates
from .metrics import distinct_n, self_bleu
from .rollout import Rollout

__all__ = ["Evaluator", "target_p_record", "CONSTRAINT_FIT_SEED_OFFSET", "QRS_SEED_OFFSET"]

#: the constraint fit draws its samples from seed ``trainer.seed + CONSTRAINT_FIT_SEED_OFFSET``
CONSTRAINT_FIT_SEED_OFFSET = 7919
#: the QRS acceptance uniforms of the evaluation come from seed ``trainer.eval_seed + QRS_SEED_OFFSET``
QRS_SEED_OFFSET = 104729


def target_p_record(log_pi: torch.Tensor, log_P: torch.Tensor, log_a: torch.Tensor, alignment: torch.Tensor,
                    ctx: torch.Tensor, texts: list[str], contexts: list[str], seed: int) -> dict:
    """The target p(·|c) = P(·, c)/Z_c itself, seen through an evaluation sample x_i ~ π (π untruncated;
    tensors [M] float64 except ``ctx``, the context index of each sample). Self-contained: Z_c is estimated
    from the same sample, Ẑ_c = mean over context c's samples of P/π.

    Self-normalised IS estimates, per context with w_i = (P/π)(x_i) / Σ_{j in c} (P/π)(x_j), then averaged
    uniformly over the contexts that have a sample in p's support (``target_contexts``):
    ``target_alignment`` = E_p[alignment], ``target_entropy`` = H(p(·|c)) = log Z_c − E_p[log P],
    ``target_kl_a`` = KL(p‖a) = E_p[log P − log a] − log Z_c. Standard errors by the delta method,
    (Σ_i w_i² (f_i − f̂)²)^½ per context (ratio estimates: consistent, biased at small effective sample size).

    QRS (fdiv_align/objectives/qrs.py): the first half of the sample is the pilot that fixes, per context,
    log β_c = max over its pilot samples of log P/π (a context without a pilot sample in p's support gets
    none, and is counted in ``qrs_contexts_without_pilot``); the second half is accepted with probability
    min(1, P/(β_c π)) (uniforms from ``seed + QRS_SEED_OFFSET``). Accepted samples follow p_β(·|c), with
    TV(p, p_β) ≤ 1 − Z_β/Z estimated on the second half (``qrs_tv_bound``, the mean over contexts; the pilot
    is independent of it). ``qrs_samples`` holds the accepted texts, contexts and alignments.
    """
    M = log_pi.numel()
    support = torch.isfinite(log_P)
    log_r = log_P - log_pi
    rec, sums, variances = {}, {"target_alignment": [], "target_entropy": [], "target_kl_a": []}, {}
    for c in torch.unique(ctx[support]).tolist():
        i = ((ctx == c) & support).nonzero().squeeze(1)
        w = torch.softmax(log_r[i], 0)
        log_z = float(torch.logsumexp(log_r[i], 0)) - math.log(int((ctx == c).sum()))
        for key, f in (("target_alignment", alignment[i]), ("target_entropy", log_z - log_P[i]),
                       ("target_kl_a", log_P[i] - log_a[i] - log_z)):
            est = float((w * f).sum())
            sums[key].append(est)
            variances.setdefault(key, []).append(float((w**2 * (f - est) ** 2).sum()))
    rec["target_contexts"] = len(sums["target_alignment"])
    for key, values in sums.items():
        k = len(values)
        rec[key] = sum(values) / k if k else None
        rec[key + "_se"] = math.sqrt(sum(variances[key])) / k if k else None
    uniforms = torch.rand(M, generator=torch.Generator().manual_seed(seed + QRS_SEED_OFFSET), dtype=torch.float64)
    half = torch.arange(M) >= M // 2
    accepted, proposed, bounds, no_pilot = [], 0, [], 0
    for c in torch.unique(ctx).tolist():
        pilot, test = (ctx == c) & ~half & support, ((ctx == c) & half).nonzero().squeeze(1)
        if not pilot.any():
            no_pilot += 1
            continue
        log_beta = choose_log_beta(log_P[pilot], log_pi[pilot])
        proposed += test.numel()
        accepted += test[qrs_accept(log_P[test], log_pi[test], log_beta, uniforms[test])].tolist()
        if support[test].any():
            bounds.append(qrs_estimates(log_P[test], log_pi[test], log_beta).tv_bound)
    rec.update(qrs_proposed=proposed, qrs_accepted=len(accepted),
               qrs_acceptance_rate=len(accepted) / proposed if proposed else None,
               qrs_tv_bound=sum(bounds) / len(bounds) if bounds else None, qrs_contexts_without_pilot=no_pilot,
               qrs_samples={"texts": [texts[i] for i in accepted], "contexts": [contexts[i] for i in accepted],
                            "alignment": [float(alignment[i]) for i in accepted]})
    return rec


class Evaluator:
    """The trainer's evaluations. ``collect(context_ids, uniforms, micro_batch_size, proposal=False,
    score_target=True) -> Rollout`` draws from the current policy and scores, gathered over processes
    (:meth:`fdiv_align.training.trainer.Trainer.collect_rollout`); ``micro_batch_size`` rows are sampled
    at a time."""

    def __init__(self, collect: Callable[..., Rollout], num_contexts: int, micro_batch_size: int, divergence=None,
                 truncated: bool = False):
        self.collect, self.num_contexts, self.micro = collect, num_contexts, micro_batch_size
        self.divergence = divergence  # the trained divergence, also reported (``train_divergence``)
        #: top-k/top-p sampling: π's support may miss p's, so no target-p estimates (QRS cannot reach p)
        self.truncated = truncated

    def evaluate(self, num_samples: int, seed: int, max_new_tokens: int, log_z: LogZAccumulator,
                 samples_seen: int) -> tuple[dict, dict]:
        """(record, samples) of the fixed evaluation sample (see the module docstring)."""
        M = num_samples
        g = torch.Generator().manual_seed(seed)
        ctx = torch.arange(M) % self.num_contexts
        U = torch.rand((M, max_new_tokens), generator=g, dtype=torch.float64)
        rollout = self.collect(ctx, U, self.micro, proposal=False)
        log_pi, log_a, log_P, align, texts = rollout.log_pi, rollout.log_a, rollout.log_P, rollout.alignment, rollout.texts
        lz, known = log_z.log_z(ctx)
        record = {"kind": "eval", "alignment": float(align.mean()), "alignment_se": float(align.std() / math.sqrt(M)),
                  "kl_pi_a": float((log_pi - log_a).mean()), "kl_pi_a_se": float((log_pi - log_a).std() / math.sqrt(M)),
                  "entropy": float(-log_pi.mean()), "entropy_per_token": float(-log_pi.sum() / rollout.lengths.sum()),
                  "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "distinct_3": distinct_n(texts, 3),
                  "self_bleu_3": self_bleu(texts, 3), "samples_seen": samples_seen}
        if known.all():
            est = estimate_divergences(log_pi, log_pi, log_P, lz)
            if self.divergence is not None:
                add_trained_divergence(est, self.divergence, log_pi, log_pi, log_P, lz)
            for key in ("kl_p_pi", "kl_pi_p", "js", "tv", "train_divergence"):
                if key in est:
                    record[key], record[key + "_se"] = est[key].value, est[key].stderr
        if not self.truncated:
            record.update(target_p_record(log_pi, log_P, log_a, align.double(), ctx, texts, rollout.context_texts, seed))
        return record, {"texts": texts, "contexts": rollout.context_texts, "alignment": align.tolist()}

    def fit_constraints(self, num_samples: int, seed: int, max_new_tokens: int, constraints) -> dict | None:
        """Fit λ of the distributional ``constraints`` on ``num_samples`` samples of the initial policy
        (= the base); None when there are none."""
        if not constraints:
            return None
        g = torch.Generator().manual_seed(seed + CONSTRAINT_FIT_SEED_OFFSET)
        ctx = torch.randint(self.num_contexts, (num_samples,), generator=g)
        U = torch.rand((num_samples, max_new_tokens), generator=g, dtype=torch.float64)
        rollout = self.collect(ctx, U, self.micro, proposal=False, score_target=False)
        fits = {}
        for c in constraints:
            fit = c.fit(rollout.texts, rollout.context_texts, rollout.log_a, rollout.log_q)
            fits[c.name] = {"lambdas": fit.lambdas.tolist(), "achieved": fit.achieved.tolist(), "targets": fit.targets.tolist(),
                            "iterations": fit.iterations, "ess": fit.ess}
        return fits
