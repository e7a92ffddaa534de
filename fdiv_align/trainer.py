"""The one f-DPG training loop, for every divergence (docs/math.md; the run-safety contracts and the
module map in docs/design.md).

One step (:meth:`Trainer.train_step`, top to bottom): draw contexts and uniforms → sample x ∼ q with
log q recorded (q = πθ on-policy, the frozen proposal off-policy: fdiv_align/proposal.py) → log a(x)
(:meth:`Policy.reference_logprobs`) → log P = log a + log Φ → the loss (:class:`FDivergenceLoss`:
Ẑ_c, pseudo-rewards, baseline, coefficients w(R − B)) → surrogate −Σ coefficient·log πθ / N per
micro-batch, backward → clip, optimiser and LR step → metrics.

On-policy, the log π of the coefficients is the log q recorded while sampling (same weights, so
w ≡ 1 and no extra forward); off-policy a no-grad forward over the batch comes first. Data parallel
runs shard the batch and gather the per-sample vectors (fdiv_align/distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import list_checkpoints, save_checkpoint
from .config import Config, to_dict, validate
from .distributed import process_group
from .divergences import get_divergence
from .estimators import add_trained_divergence, estimate_divergences
from .evaluation import Evaluator
from .logprobs import SamplingConfig
from .loss import FDivergenceLoss
from .metrics import MetricsLogger, say
from .models import LoadedModel, load_configured, resolve_device
from .policy import prepare_policy
from .precision import compute_plan
from .proposal import OffPolicyProposal
from .run import run
from .sampling import Batch
from .targets import load_contexts
from .targets.tasks import Task, get_task

__all__ = ["Trainer", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """The step's gradient is ±inf/NaN: the parameters were not updated (see the message for the cause)."""


def _divergence(cfg: Config):
    return get_divergence(cfg.divergence.name, **cfg.divergence.params)


class Trainer:
    """f-DPG trainer. ``Trainer(cfg).train()`` returns the run summary (also written to summary.json).

    ``lm`` and ``task`` may be given directly (tests, custom targets); otherwise they are built
    from ``cfg.model`` and ``cfg.task``. ``callbacks`` are called as ``cb(trainer, step, record)``
    after every step.
    """

    def __init__(self, cfg: Config, lm: LoadedModel | None = None, task: Task | None = None,
                 output_dir: str | os.PathLike | None = None, callbacks=()):
        self.cfg = cfg
        tc = cfg.trainer
        validate(cfg)
        self.divergence = _divergence(cfg)
        # the task first: a bad task name, parameter or contexts file fails before anything is loaded or written
        self.task = task if task is not None else get_task(cfg.task.name, **cfg.task.params)
        self.contexts = load_contexts(cfg.task.contexts) if cfg.task.contexts else list(self.task.contexts)
        if not self.contexts:
            raise ValueError(f"task {self.task.name!r} has an empty context list: give at least one context "
                             f"(task.contexts=<file>, or Task(contexts=[...]); '' is the unconditional context)")
        self.max_new_tokens = cfg.task.max_new_tokens or self.task.max_new_tokens
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        self._seed_everything(tc.seed)
        self.group = process_group()
        self.rank = self.group.rank
        self.output_dir = Path(output_dir or cfg.output_dir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks)

        self.device = resolve_device(cfg.model.device)
        self.plan = compute_plan(tc.precision, tc.compile, self.device)
        say(self.plan.describe())
        lm = lm if lm is not None else self._load_model()
        # whatever loading consumed (a first-run materialisation initialises a model), the run's random
        # state — LoRA initialisation included — depends on the seed alone
        self._seed_everything(tc.seed)
        self.policy = prepare_policy(cfg.model, lm, self.device, self.plan, SamplingConfig(tc.temperature, tc.top_k, tc.top_p),
                                     tc.fp32_head, tc.fused_logprobs)

        self.target = self.task.target(self.policy.base_lm())
        baseline_kwargs = {"momentum": tc.baseline_momentum} if tc.baseline == "moving_average" else {}
        # the floor (if any) is applied to log Φ before the loss (TargetScores.floored_log_P), not to log P
        self.loss_fn = FDivergenceLoss(self.divergence, tc.baseline, None, num_contexts=len(self.contexts),
                                       logratio_resolution=tc.logratio_resolution or None, **baseline_kwargs)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.proposal = OffPolicyProposal(self.policy.trainable, tc.proposal_criterion, tc.proposal_update_every) \
            if tc.proposal == "off" else None
        self.evaluator = Evaluator(lambda c, u: self._sample(c, u, proposal=False), self.policy.reference_logprobs,
                                   self.target, self._floored_log_P, self.group, len(self.contexts),
                                   tc.eval_micro_batch_size or tc.micro_batch_size, self.divergence, truncated=bool(tc.top_k) or tc.top_p < 1.0)
        self.step = 0
        self.samples_seen = 0
        self.base_eval = None
        self.pending_eval = False  # the evaluation due at this step has not been logged yet
        self.logger = MetricsLogger(self.output_dir, cfg.logger.jsonl, cfg.logger, to_dict(cfg)) if self.rank == 0 else None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load_model(self) -> LoadedModel:
        m = self.cfg.model
        say(f"loading model {m.name} on {self.device}")
        return load_configured(m, self.device)

    def _make_optimizer(self):
        tc = self.cfg.trainer
        params = list(self.policy.trainable.values())
        if tc.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, lr=tc.lr, weight_decay=tc.weight_decay)
            except Exception as exc:  # noqa: BLE001 - report the backend's reason
                raise RuntimeError(f"trainer.optimizer=adamw8bit is unavailable here: {exc}") from exc
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)

    def _lr_lambda(self, step: int) -> float:
        tc = self.cfg.trainer
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule == "linear":
            span = max(1, tc.steps - tc.warmup_steps)
            return max(0.0, 1.0 - (step - tc.warmup_steps) / span)
        return 1.0

    def _floored_log_P(self, scores) -> torch.Tensor:
        return scores.floored_log_P(self.cfg.divergence.log_phi_floor)

    def _sample(self, context_index: torch.Tensor, uniforms: torch.Tensor, proposal: bool = True) -> Batch:
        """Samples of q: the frozen proposal off-policy (``proposal``), else the current policy."""
        swap = self.proposal.weights() if proposal and self.proposal is not None else contextlib.nullcontext()
        with swap:
            return self.policy.sample(self.contexts, context_index, uniforms, self.max_new_tokens, self.cfg.trainer.stop_at_eos)

    def policy_loss(self, batch: Batch, coefficients: torch.Tensor, n_total: int) -> torch.Tensor:
        """The surrogate −Σ_i coefficient_i · log πθ(x_i) / N for (a micro-batch of) the step's samples."""
        return self.policy.weighted_logprob_sum(batch, -coefficients / n_total)

    def abortable(self, stops, phase: str):
        """Single process: ``stops.abortable(phase)``. Data parallel: not abortable (a process leaving a
        step or an evaluation midway would leave the others waiting in a collective), so it finishes first."""
        if stops is None or self.group.world > 1:
            return contextlib.nullcontext()
        return stops.abortable(phase)

    # ------------------------------------------------------------------ one step
    def train_step(self, stops=None) -> dict:
        """One f-DPG step. Sampling and scoring (everything before the loss updates Ẑ and the baseline)
        may be abandoned by a stop signal (``RunInterrupted``), leaving no trace but the generator's draws."""
        tc = self.cfg.trainer
        t0 = time.perf_counter()
        N, T = tc.samples_per_step, self.max_new_tokens
        with self.abortable(stops, f"sampling and scoring of step {self.step + 1}"):
            ctx_all = torch.randint(len(self.contexts), (N,), generator=self.generator)
            U_all = torch.rand((N, T), generator=self.generator, dtype=torch.float64)
            sl = self.group.shard(N)
            batch = self._sample(ctx_all[sl], U_all[sl])
            t_sample = time.perf_counter()
            log_a = self.policy.reference_logprobs(batch)
            scores = self.target.log_scores(batch, log_a)
            scores_log_P = self._floored_log_P(scores)
            alignment = scores.alignment
            log_q = batch.logq.double()
            t_score = time.perf_counter()

        self.policy.model.train()
        micro = [torch.arange(len(batch))[i:i + tc.micro_batch_size] for i in range(0, len(batch), tc.micro_batch_size)]
        if self.proposal is None:
            log_pi = log_q  # on-policy: π = q, recorded at sampling
        else:  # off-policy: the coefficients need log π before the gradient pass
            with torch.no_grad():
                log_pi = torch.cat([self.policy.policy_logprobs(batch.select(m)).double().cpu() for m in micro])

        gather = self.group.gather
        g_log_pi, g_log_q, g_log_P = gather(log_pi), gather(log_q), gather(scores_log_P)
        g_ctx, g_log_a, g_align = gather(batch.context_index), gather(log_a), gather(alignment)
        out = self.loss_fn(g_log_pi, g_log_q, g_log_P, g_ctx)
        coef = out.coefficients[sl].to(torch.float32)

        self.optimizer.zero_grad(set_to_none=True)
        for m in micro:
            self.policy_loss(batch.select(m), coef[m], N).backward()
        self.group.allreduce_grads(self.policy.trainable.values())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.policy.trainable.values()), tc.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(self._non_finite_message(grad_norm, out))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.samples_seen += N
        t_end = time.perf_counter()

        log_z, known = self.loss_fn.log_z.log_z(g_ctx)
        est = estimate_divergences(g_log_pi, g_log_q, g_log_P, torch.where(known, log_z, torch.zeros_like(log_z)),
                                   base_logprobs=g_log_a, alignment_scores=g_align)
        if not known.all():  # the estimates that involve p need every sample's Z
            est = {k: v for k, v in est.items() if k in ("kl_pi_a", "alignment")}
        record = {
            "kind": "train",
            "loss": float(out.loss),
            "alignment": float(g_align.mean()),
            "pseudo_reward": float(out.pseudo_rewards[~out.skipped].mean()) if (~out.skipped).any() else 0.0,
            "ess": float(out.ess),
            "log_z": float(log_z[known].mean()) if known.any() else float("nan"),
            "skipped": int(out.skipped.sum()),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_seen": self.samples_seen,
            "seconds": t_end - t0,
            "seconds_sample": t_sample - t0,
            "seconds_score": t_score - t_sample,
            "seconds_update": t_end - t_score,
            "samples_per_second": N / (t_end - t0),
        }
        if known.all():  # the trained divergence itself, from its f (any registered divergence)
            add_trained_divergence(est, self.divergence, g_log_pi, g_log_q, g_log_P, log_z)
        for key, e in est.items():
            record[key] = e.value
            if key not in ("alignment",):
                record[key + "_se"] = e.stderr
        if self.proposal is not None:
            self.proposal.check(self.step, g_log_pi, g_log_q, g_log_P, log_z, known, record)
        return record

    def _non_finite_message(self, grad_norm: float, out) -> str:
        coef = out.coefficients[~out.skipped] if out.skipped is not None else out.coefficients
        saved = list_checkpoints(self.output_dir / "checkpoints")
        saved = f"the last checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint was written yet"
        return (f"step {self.step + 1}: the gradient norm is {grad_norm} with divergence {self.divergence.name!r}: "
                f"the surrogate's coefficients are heavy-tailed (max |coefficient| {float(coef.abs().max()):.3g}, "
                f"ESS {float(out.ess):.1f} of {len(coef)}) and the backward pass overflowed. The parameters were NOT "
                f"updated; {saved}. Divergences whose f′ is unbounded (chi2, alpha ≥ 1, "
                f"rkl) weight rare samples by powers of π/p: use a bounded one (js, tv), a smaller trainer.lr, or a "
                f"higher divergence.log_phi_floor.")

    def evaluate(self) -> tuple[dict, dict]:
        """The fixed evaluation sample (fdiv_align/evaluation.py) with the current Ẑ."""
        tc = self.cfg.trainer
        return self.evaluator.evaluate(tc.eval_samples, tc.eval_seed, self.max_new_tokens, self.loss_fn.log_z,
                                       self.samples_seen)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "config": to_dict(self.cfg),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.policy.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "proposal": None if self.proposal is None else self.proposal.state_dict(),
            "loss": self.loss_fn.state_dict_extra(),
            "constraints": [c.state_dict() for c in self.target.constraints],
            "base_eval": self.base_eval,
            "pending_eval": self.pending_eval,
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "python": random.getstate(),
                    "numpy": np.random.get_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["config"], to_dict(self.cfg)
        for group in ("model", "divergence", "task"):
            if saved[group] != now[group]:
                raise ValueError(f"cannot resume: the checkpoint's {group} config {saved[group]} differs from the current {now[group]}")
        with torch.no_grad():
            for n, p in self.policy.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.proposal is not None:
            self.proposal.load_state_dict(state["proposal"])
        self.loss_fn.load_state_dict_extra(state["loss"])
        for c, s in zip(self.target.constraints, state["constraints"]):
            c.load_state_dict(s)
        self.base_eval = state["base_eval"]
        self.pending_eval = bool(state.get("pending_eval", False))
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])

    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        return save_checkpoint(self.output_dir / "checkpoints", self.step, self.state_dict(), self.cfg.trainer.keep_checkpoints)

    def train(self) -> dict:
        """Run to ``trainer.steps`` and return the summary (fdiv_align/run.py: resume, evaluations,
        checkpoints, stop signals)."""
        return run(self)
