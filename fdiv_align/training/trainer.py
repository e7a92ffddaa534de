"""The one f-DPG training loop, for every divergence (docs/math.md; the layers, the data path and the
run-safety contracts in docs/design.md).

One step, :meth:`Trainer.train_step`, reads top to bottom:

1. draw the step's contexts and uniforms from the run's generator;
2. :meth:`Trainer.collect_rollout` → :class:`~fdiv_align.training.rollout.Rollout`: sample x ∼ q with
   log q recorded (q = πθ on-policy, the frozen proposal off-policy, fdiv_align/training/proposal.py),
   log a (:meth:`Policy.reference_logprobs`), log P = log a + log Φ, log π (= log q on-policy, a no-grad
   forward off-policy), gathered once over processes;
3. the loss (:class:`~fdiv_align.objectives.loss.FDivergenceLoss`): Ẑ_c updated, pseudo-rewards,
   baseline, coefficients w(R − B);
4. :meth:`Trainer._update`: the surrogate −Σ coefficient·log πθ / N per micro-batch, backward (its value
   is the logged ``loss``), gradients summed over processes by DDP or FSDP2, clip, optimiser and LR step;
5. :meth:`Trainer.step_metrics`: the record of the step (IS estimates of the divergences, ESS, timings).

:meth:`Trainer.fit` runs the steps with resume, evaluations, checkpoints and stop signals; what a
checkpoint holds beyond the weights, optimiser and estimator state is :class:`TrainState`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, to_dict, validate
from ..extras import require
from ..lm.batch import render_contexts
from ..lm.export import FINAL_MODEL_DIR, save_final_model
from ..lm.logprobs import SamplingConfig
from ..lm.models import LoadedModel, load_configured, resolve_device
from ..lm.policy import prepare_policy
from ..lm.precision import compute_plan
from ..objectives.divergences import get_divergence
from ..objectives.estimators import add_trained_divergence, estimate_divergences
from ..objectives.loss import FDivergenceLoss, FDPGLossOutput
from ..targets import BaseLM, load_contexts
from ..targets.tasks import Task, get_task
from .checkpoint import list_checkpoints, load_sharded
from .config_changes import check_config_changes
from .distributed import data_parallel, process_group, shard_like, whole
from .evaluation import Evaluator
from .export import export_trainable
from .interrupts import RunInterrupted, stop_requests
from .metrics import MetricsLogger, say
from .proposal import OffPolicyProposal
from .rollout import Rollout
from .run_dir import RunDir

__all__ = ["Trainer", "TrainState", "NonFiniteGradientError", "progress_postfix"]


class NonFiniteGradientError(FloatingPointError):
    """The step's gradient is ±inf/NaN: the parameters were not updated (see the message for the cause)."""


@dataclass
class TrainState:
    """Where a run stands; with the random states (:func:`rng_states`) it is what a checkpoint holds
    besides the weights, the optimiser and the estimators' state."""

    step: int = 0  # completed steps
    samples_seen: int = 0
    base_eval: dict | None = None  # the evaluation before the first step
    pending_eval: bool = False  # the evaluation due at this step has not been logged yet
    final_eval: dict | None = None  # the final evaluation, once logged (cleared by any further step)
    collapsed_at: int | None = None  # the first step whose samples were one text per context (said once)


def rng_states(generator: torch.Generator) -> dict:
    """The random states of a run as tensors and plain data (what a weights-only checkpoint holds)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)}


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints hold the array
    np.random.set_state((name, keys.astype(np.uint32), *rest))


def progress_postfix(record: dict) -> dict:
    """Progress-bar fields: IS estimates shown as value±standard error (they are noisy, and may be
    negative where the true divergence is ≥ 0)."""
    fields = {"align": f"{record['alignment']:.3f}"}
    for key in ("kl_p_pi", "kl_pi_a"):
        if key in record:
            fields[key] = f"{record[key]:.2f}±{record.get(key + '_se', float('nan')):.2f}"
    fields["samp/s"] = f"{record['samples_per_second']:.1f}"
    return fields


class Trainer:
    """f-DPG trainer. ``Trainer(cfg).fit()`` (or ``.train()``) returns the run summary (also written to
    summary.json).

    ``lm`` and ``task`` may be given directly (tests, custom targets); otherwise they are built
    from ``cfg.model`` and ``cfg.task``. ``callbacks`` are called as ``cb(trainer, step, record)``
    after every step. ``on_start()`` is called (on rank 0) once the output directory is known to hold this
    run — a fresh start's old files set aside, or a resumed or finished run's config checked
    (fdiv_align/training/config_changes.py) — before anything is trained; the CLI records Hydra's config there.
    """

    def __init__(self, cfg: Config, lm: LoadedModel | None = None, task: Task | None = None,
                 output_dir: str | os.PathLike | None = None, callbacks=(), on_start=None):
        require("train", "fdiv_align.Trainer")
        self.cfg = cfg
        tc = cfg.trainer
        validate(cfg)
        self.divergence = get_divergence(cfg.divergence.name, **cfg.divergence.params)
        # the task first: a bad task name, parameter or contexts file fails before anything is loaded or written
        self.task = task if task is not None else get_task(cfg.task.name, **cfg.task.params)
        self.contexts = load_contexts(cfg.task.contexts, cfg.task.prompt_column) if cfg.task.contexts \
            else list(self.task.contexts)
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
        self._check_world_size()
        self.output_dir = Path(output_dir or cfg.output_dir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.run_dir = RunDir(self.output_dir, writer=self.rank == 0, artifacts=(FINAL_MODEL_DIR,))
        self.callbacks = list(callbacks)
        self.on_start = on_start

        self.device = resolve_device(cfg.model.device)
        self.plan = compute_plan(tc.precision, tc.compile, self.device, tc.fp32_head, tc.fused_logprobs, tc.decode)
        say(self.plan.describe())
        lm = lm if lm is not None else self._load_model()
        # whatever loading consumed (a first-run materialisation initialises a model), the run's random
        # state — LoRA initialisation included — depends on the seed alone
        self._seed_everything(tc.seed)
        self.policy = prepare_policy(cfg.model, lm, self.device, self.plan, SamplingConfig(tc.temperature, tc.top_k, tc.top_p))
        # several processes: DDP or FSDP2 over the policy (before the optimiser: FSDP replaces the parameters)
        self.parallel = self.policy.passes = data_parallel(self.policy, tc.parallel, self.group)

        self.contexts = render_contexts(self.policy.tokenizer, self.contexts, cfg.task.chat_template)
        self.target = self.task.target(BaseLM.of_policy(self.policy))
        baseline_kwargs = {"momentum": tc.baseline_momentum} if tc.baseline == "moving_average" else {}
        # the floor (if any) is applied to log Φ before the loss (TargetScores.floored_log_P), not to log P
        self.loss_fn = FDivergenceLoss(self.divergence, tc.baseline, num_contexts=len(self.contexts),
                                       logratio_resolution=tc.logratio_resolution or None, **baseline_kwargs)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.proposal = OffPolicyProposal(self.policy.trainable, tc.proposal_criterion, tc.proposal_update_every) \
            if tc.proposal == "off" else None
        self.evaluator = Evaluator(self.collect_rollout, len(self.contexts), tc.eval_micro_batch_size or tc.micro_batch_size,
                                   self.divergence, truncated=bool(tc.top_k) or tc.top_p < 1.0)
        self.state = TrainState()
        self.logger = MetricsLogger(self.output_dir, cfg.logger.jsonl, cfg.logger, to_dict(cfg)) if self.rank == 0 else None

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def samples_seen(self) -> int:
        return self.state.samples_seen

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _check_world_size(self) -> None:
        """Every process needs rows of each batch; FSDP's passes are collectives, so under it every process
        needs as many rows (hence as many passes) as the others."""
        tc, world = self.cfg.trainer, self.group.world
        batches = {"trainer.samples_per_step": tc.samples_per_step, "trainer.eval_samples": tc.eval_samples,
                   "task.constraint_fit_samples": self.cfg.task.constraint_fit_samples}
        for key, n in batches.items():
            if n < world:
                raise ValueError(f"{key}={n} is smaller than the {world} processes: each needs at least one row")
            if tc.parallel == "fsdp" and world > 1 and n % world:
                raise ValueError(f"trainer.parallel=fsdp: {key}={n} must be a multiple of the {world} processes "
                                 f"(every process runs the same passes); or use trainer.parallel=ddp")
        if tc.parallel == "fsdp" and world > 1 and tc.optimizer != "adamw":
            raise ValueError(f"trainer.parallel=fsdp shards AdamW's moments; trainer.optimizer={tc.optimizer} is not "
                             f"supported there: use trainer.optimizer=adamw or trainer.parallel=ddp")

    def _load_model(self) -> LoadedModel:
        m = self.cfg.model
        say(f"loading model {m.name} on {self.device}")
        return load_configured(m, self.device)

    def _make_optimizer(self):
        tc = self.cfg.trainer
        params = list(self.policy.trainable.values())
        if tc.optimizer == "adamw8bit":
            require("quant", "trainer.optimizer=adamw8bit")
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

    def abortable(self, stops, phase: str):
        """Single process: ``stops.abortable(phase)``. Data parallel: not abortable (a process leaving a
        step or an evaluation midway would leave the others waiting in a collective), so it finishes first."""
        if stops is None or self.group.world > 1:
            return contextlib.nullcontext()
        return stops.abortable(phase)

    # ------------------------------------------------------------------ data: the rollout
    def _sample(self, context_ids: torch.Tensor, uniforms: torch.Tensor, proposal: bool = True):
        """Samples of q: the frozen proposal off-policy (``proposal``), else the current policy."""
        swap = self.proposal.weights() if proposal and self.proposal is not None else contextlib.nullcontext()
        with swap:
            return self.policy.sample(self.contexts, context_ids, uniforms, self.max_new_tokens, self.cfg.trainer.stop_at_eos)

    def collect_rollout(self, context_ids: torch.Tensor, uniforms: torch.Tensor, micro_batch_size: int | None = None,
                        proposal: bool = True, score_target: bool = True) -> Rollout:
        """Sample this process's rows of the global (``context_ids`` [N], ``uniforms`` [N, T]) from q —
        the proposal off-policy when ``proposal``, else πθ — ``micro_batch_size`` rows at a time (None:
        at once), score them (log a; log P and alignment unless ``score_target`` is false) and gather the
        per-sample vectors of all processes."""
        shard = self.group.shard(len(context_ids))
        piece = micro_batch_size or max(1, shard.stop - shard.start)
        batches, log_a, log_P, alignment = [], [], [], []
        seconds_sample = seconds_score = 0.0
        for start in range(shard.start, shard.stop, piece):
            rows = slice(start, min(shard.stop, start + piece))
            t0 = time.perf_counter()
            batch = self._sample(context_ids[rows], uniforms[rows], proposal=proposal)
            t1 = time.perf_counter()
            log_a.append(self.policy.reference_logprobs(batch))
            if score_target:
                scores = self.target.log_scores(batch, log_a[-1])
                log_P.append(scores.floored_log_P(self.cfg.divergence.log_phi_floor))
                alignment.append(scores.alignment)
            batches.append(batch)
            seconds_sample += t1 - t0
            seconds_score += time.perf_counter() - t1
        log_q = torch.cat([b.logq.double() for b in batches])
        log_pi = log_q if not (proposal and self.proposal is not None) else self._policy_logprobs(batches)
        gather, gather_texts = self.group.gather, self.group.gather_texts
        return Rollout(batches, shard, gather(context_ids[shard]), gather(log_q), gather(log_pi), gather(torch.cat(log_a)),
                       gather(torch.cat(log_P)) if score_target else None,
                       gather(torch.cat(alignment)) if score_target else None,
                       gather(torch.cat([b.mask.sum(-1) for b in batches])),
                       gather_texts([t for b in batches for t in b.texts]),
                       gather_texts([c for b in batches for c in b.context_texts]), seconds_sample, seconds_score)

    @torch.no_grad()
    def _policy_logprobs(self, batches) -> torch.Tensor:
        """Off-policy: log πθ of q's samples, before the update (the coefficients need it)."""
        self.policy.model.train()
        rows = self.cfg.trainer.micro_batch_size
        return torch.cat([self.policy.policy_logprobs(b.select(torch.arange(len(b))[i:i + rows])).double().cpu()
                          for b in batches for i in range(0, len(b), rows)])

    # ------------------------------------------------------------------ one step
    def train_step(self, stops=None) -> dict:
        """One f-DPG step (see the module docstring). Sampling and scoring — everything before the loss
        updates Ẑ and the baseline — may be abandoned by a stop signal (``RunInterrupted``), leaving no
        trace but the generator's draws."""
        t0 = time.perf_counter()
        N, T = self.cfg.trainer.samples_per_step, self.max_new_tokens
        with self.abortable(stops, f"sampling and scoring of step {self.step + 1}"):
            context_ids = torch.randint(len(self.contexts), (N,), generator=self.generator)
            uniforms = torch.rand((N, T), generator=self.generator, dtype=torch.float64)
            rollout = self.collect_rollout(context_ids, uniforms)
        t_scored = time.perf_counter()
        loss = self.loss_fn(rollout.log_pi, rollout.log_q, rollout.log_P, rollout.context_ids)
        surrogate, grad_norm = self._update(rollout, loss)
        self.state.step += 1
        self.state.samples_seen += N
        timings = {"seconds": time.perf_counter() - t0, "seconds_sample": rollout.seconds_sample,
                   "seconds_score": rollout.seconds_score, "seconds_update": time.perf_counter() - t_scored}
        return self.step_metrics(rollout, loss, surrogate, grad_norm, timings)

    def policy_loss(self, batch, coefficients: torch.Tensor, n_total: int) -> torch.Tensor:
        """The surrogate −Σ_i coefficient_i · log πθ(x_i) / N for (a micro-batch of) the step's samples."""
        return self.policy.weighted_logprob_sum(batch, -coefficients / n_total)

    def _update(self, rollout: Rollout, loss: FDPGLossOutput) -> tuple[float, float]:
        """Backward of the surrogate over this process's micro-batches (the engine sums the gradients over
        processes after the last one), clipped, then the optimiser and LR steps. Returns (the surrogate's
        value over all processes, the gradient norm before clipping)."""
        tc = self.cfg.trainer
        batch = rollout.batch
        coefficients = loss.coefficients[rollout.shard].to(torch.float32)
        self.policy.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        surrogate = 0.0
        starts = range(0, len(batch), tc.micro_batch_size)
        for i in (self.parallel.micro_batches(len(starts)) if self.parallel else range(len(starts))):
            rows = torch.arange(len(batch))[starts[i]:starts[i] + tc.micro_batch_size]
            part = self.policy_loss(batch.select(rows), coefficients[rows], len(rollout))
            (part * self.parallel.loss_scale if self.parallel else part).backward()
            surrogate += float(part.detach())
        surrogate = self.group.sum(surrogate)
        params = list(self.policy.trainable.values())
        grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or math.inf)))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(self._non_finite_message(grad_norm, loss))
        self.optimizer.step()
        self.scheduler.step()
        return surrogate, grad_norm

    def step_metrics(self, rollout: Rollout, loss: FDPGLossOutput, surrogate: float, grad_norm: float,
                     timings: dict) -> dict:
        """The step's record: the surrogate's value, alignment, pseudo-reward, ESS, log Ẑ, IS estimates
        of the divergences on q's samples (those that involve p only once every sample's Z is known)."""
        log_z, known = self.loss_fn.log_z.log_z(rollout.context_ids)
        estimates = estimate_divergences(rollout.log_pi, rollout.log_q, rollout.log_P,
                                         torch.where(known, log_z, torch.zeros_like(log_z)),
                                         base_logprobs=rollout.log_a, alignment_scores=rollout.alignment)
        if known.all():  # the trained divergence itself, from its f (any registered divergence)
            add_trained_divergence(estimates, self.divergence, rollout.log_pi, rollout.log_q, rollout.log_P, log_z)
        else:
            estimates = {k: v for k, v in estimates.items() if k in ("kl_pi_a", "alignment")}
        live = ~loss.skipped
        distinct = len(set(zip(rollout.context_texts, rollout.texts)))
        if distinct == len(set(rollout.context_texts)) < len(rollout) and self.state.collapsed_at is None:
            self.state.collapsed_at = self.step
            say(f"warning: {self._collapse_warning(len(rollout))}")
        record = {
            "kind": "train",
            "loss": surrogate,
            "alignment": float(rollout.alignment.mean()),
            "pseudo_reward": float(loss.pseudo_rewards[live].mean()) if live.any() else 0.0,
            "ess": float(loss.ess),
            "log_z": float(log_z[known].mean()) if known.any() else float("nan"),
            "skipped": int(loss.skipped.sum()),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_seen": self.samples_seen,
            "distinct_samples": distinct,  # distinct (context, text) pairs among the step's samples
            **timings,
            "samples_per_second": len(rollout) / timings["seconds"],
        }
        for key, estimate in estimates.items():
            record[key] = estimate.value
            if key != "alignment":
                record[key + "_se"] = estimate.stderr
        if self.proposal is not None:
            record.update(self.proposal.observe(self.step, *self._proposal_distances(rollout, log_z, known, estimates)))
        return record

    def _proposal_distances(self, rollout: Rollout, log_z: torch.Tensor, known: torch.Tensor, estimates: dict):
        """(D(p‖πθ), D(p‖q)) by the proposal's criterion, both from q's samples; (None, None) while Z is unknown."""
        if not known.all():
            return None, None
        key = "kl_p_pi" if self.proposal.criterion == "fkl" else "tv"
        to_q = estimate_divergences(rollout.log_q, rollout.log_q, rollout.log_P, log_z)[key]
        return estimates[key].value, to_q.value

    def _collapse_warning(self, n: int) -> str:
        return (f"step {self.state.collapsed_at}: the {n} samples were one text per context — the policy may have "
                f"collapsed onto single sequences (every sample identical, e.g. empty), where the gradient vanishes and "
                f"it cannot recover; a smaller trainer.lr usually avoids it (samples.jsonl shows the texts)")

    def _non_finite_message(self, grad_norm: float, loss: FDPGLossOutput) -> str:
        coefficients = loss.coefficients[~loss.skipped]
        saved = list_checkpoints(self.run_dir.checkpoints)
        saved = f"the last checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint was written yet"
        return (f"step {self.step + 1}: the gradient norm is {grad_norm} with divergence {self.divergence.name!r}: "
                f"the surrogate's coefficients are heavy-tailed (max |coefficient| {float(coefficients.abs().max()):.3g}, "
                f"ESS {float(loss.ess):.1f} of {len(coefficients)}) and the backward pass overflowed. The parameters were "
                f"NOT updated; {saved}. Divergences whose f′ is unbounded (chi2, alpha ≥ 1, rkl) weight rare samples "
                f"by powers of π/p: use a bounded one (js, tv), a smaller trainer.lr, or a higher divergence.log_phi_floor.")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[dict, dict]:
        """(record, samples) of the fixed evaluation sample (fdiv_align/training/evaluation.py) with the current Ẑ."""
        tc = self.cfg.trainer
        return self.evaluator.evaluate(tc.eval_samples, tc.eval_seed, self.max_new_tokens, self.loss_fn.log_z,
                                       self.samples_seen)

    def _evaluate_and_log(self) -> dict:
        record, samples = self.evaluate()
        self._log(record)
        k = self.cfg.logger.log_samples
        if self.logger is not None and k:
            self.logger.log_samples(self.step, samples["texts"][:k], samples["contexts"][:k], samples["alignment"][:k])
        return record

    def _pending_evaluation(self, stops) -> dict | None:
        """The evaluation due at this step; if a stop signal abandons it, it stays pending in the
        checkpoint and is redone first on resume (None)."""
        try:
            with self.abortable(stops, f"the evaluation at step {self.step}"):
                record = self._evaluate_and_log()
        except RunInterrupted:
            return None
        self.state.pending_eval = False
        return record

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(self.step, record)

    # ------------------------------------------------------------------ the run
    def train(self) -> dict:
        """Same as :meth:`fit`."""
        return self.fit()

    def fit(self) -> dict:
        """Run to ``trainer.steps`` (resuming from the newest checkpoint) and return the summary.

        SIGINT/SIGTERM (fdiv_align/training/interrupts.py): during sampling, scoring or an evaluation
        the work in flight is abandoned at once; during an update the step is finished first. Then the
        state of the last completed step is checkpointed and ``{"status": "interrupted", ...}`` is
        returned; rerunning in the same output directory continues exactly. A second signal exits at once.
        """
        with stop_requests() as stops:
            try:
                return self._fit(stops, time.perf_counter())
            finally:
                self._close()

    def _fit(self, stops, t_start: float) -> dict:
        tc = self.cfg.trainer
        previous = self.run_dir.summary() if tc.resume else None
        if previous is not None and previous.get("status") == "finished":
            check_config_changes(previous.get("config"), to_dict(self.cfg), f"the finished run in {self.output_dir}",
                                 "trainer.resume=false")
            if previous.get("steps") == tc.steps:
                self._started()
                return previous  # a finished run (e.g. a resumed sweep): nothing to redo
        fits = None
        if not (tc.resume and self._resume()):
            try:
                fits = self._start(stops)
            except RunInterrupted as exc:
                say(f"interrupted during {exc.phase}: no step was taken, nothing to save")
                return {"status": "interrupted", "step": 0, "signal": exc.signum, "saved": False}
        self._run_steps(stops)
        if not stops.requested and tc.steps > 0 and self.state.final_eval is None:
            try:
                with self.abortable(stops, "the final evaluation"):
                    self.state.final_eval = self._evaluate_and_log()
            except RunInterrupted:
                pass  # redone on resume: the checkpoint below has no final evaluation
        if stops.requested:
            path = self.save()
            say(f"stopped at step {self.step}; checkpoint {path}")
            return {"status": "interrupted", "step": self.step, "signal": int(stops.signum), "saved": True}
        return self._finish(fits, t_start)

    def _started(self) -> None:
        if self.on_start is not None and self.rank == 0:
            self.on_start()

    def _resume(self) -> bool:
        """Load the newest intact checkpoint (True), or find none (False). Checkpoints that all fail
        verification stop the run (CorruptCheckpointsError): starting over would silently discard them."""
        found = self.run_dir.latest_checkpoint()
        if found is None:
            return False
        _, state, path = found
        self.load_state_dict(state, path)
        if self.logger is not None:
            self.logger.truncate_after(self.step)
        say(f"resumed from {path} (step {self.step} of {self.cfg.trainer.steps})")
        self._started()
        return True

    def _start(self, stops) -> dict | None:
        """A fresh start: an earlier run's files set aside, the distributional constraints fitted (their
        fit is returned) and the base evaluated — abortable, nothing is saved before the first step."""
        self.run_dir.set_aside("trainer.resume=false" if not self.cfg.trainer.resume else "no checkpoint to resume from")
        self._started()
        if self.plan.compile:
            say("compiling the fused log-prob kernels with torch.compile (first run only; then cached)")
        with self.abortable(stops, "the base evaluation"):
            fits = self.evaluator.fit_constraints(self.cfg.task.constraint_fit_samples, self.cfg.trainer.seed,
                                                  self.max_new_tokens, self.target.constraints)
            if fits:
                self._log({"kind": "constraint_fit", **{f"{k}/{m}": v for k, d in fits.items() for m, v in d.items()}})
            if self.cfg.trainer.eval_at_start:
                self.state.base_eval = self._evaluate_and_log()
        return fits

    def _run_steps(self, stops) -> None:
        """Steps until ``trainer.steps`` or a stop request, each followed by its evaluation, callbacks,
        progress and checkpoint when due."""
        tc = self.cfg.trainer
        bar = None
        if self.cfg.logger.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc=f"f-DPG {self.divergence.name}", dynamic_ncols=True)
        try:
            if self.state.pending_eval:  # an evaluation interrupted before the last checkpoint: redo it first
                self._pending_evaluation(stops)
            while self.step < tc.steps and not stops.requested:
                random_state = (self.generator.get_state(), torch.get_rng_state())
                try:
                    record = self.train_step(stops)
                except RunInterrupted:  # sampling/scoring abandoned: the step never happened
                    self.generator.set_state(random_state[0])
                    torch.set_rng_state(random_state[1])
                    break
                self.state.final_eval = None  # a step after a final evaluation (a finished run extended)
                self._log(record)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    self.state.pending_eval = True
                    self._pending_evaluation(stops)
                for callback in self.callbacks:
                    callback(self, self.step, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(progress_postfix(record))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and not stops.requested:
                    self.save()
        finally:
            if bar is not None:
                bar.close()

    def _finish(self, fits: dict | None, t_start: float) -> dict:
        """The final checkpoint (with the final evaluation, logged by :meth:`_fit`) and model (``final_model/``:
        fdiv_align/lm/export.py), then summary.json."""
        tc = self.cfg.trainer
        final = self.state.final_eval if tc.steps > 0 else self.state.base_eval
        if tc.checkpoint_every:
            self.save()
        final_model = self._save_final_model()
        _, known = self.loss_fn.log_z.log_z(torch.arange(self.loss_fn.log_z.num_contexts))
        warnings = []
        if tc.steps > 0 and not known.any():
            warnings.append(f"no sample in {self.samples_seen} had P > 0 (every target score was 0): Z is unknown and "
                            f"the policy was never updated; the target may be unreachable from the base model")
        for warning in warnings:
            say(f"warning: {warning}")
        if self.state.collapsed_at is not None:  # said when it happened
            warnings.append(self._collapse_warning(tc.samples_per_step))
        summary = {"status": "finished", "steps": self.step, "samples_seen": self.samples_seen,
                   "divergence": self.divergence.name, "task": self.task.name, "model": self.cfg.model.name,
                   "lora": self.policy.use_lora, "seed": tc.seed, "base": self.state.base_eval, "final": final,
                   "constraint_fit": fits, "compute": self.plan.as_dict(), "warnings": warnings,
                   "final_model": None if final_model is None else str(final_model),
                   "config": to_dict(self.cfg), "wall_seconds_this_run": time.perf_counter() - t_start}
        self.run_dir.write_summary(summary)
        return summary

    def _save_final_model(self) -> Path | None:
        """``final_model/`` (written by rank 0; None elsewhere): the policy itself, or under FSDP the model that
        the run's config builds with the gathered trainable weights (training/export.py)."""
        out = self.run_dir.path / FINAL_MODEL_DIR
        if self._sharded:
            trainable = whole(dict(self.policy.trainable))  # every rank takes part in the gathers
            return export_trainable(self.cfg, trainable, out, device=str(self.device)) if self.rank == 0 else None
        return save_final_model(self.policy, out) if self.rank == 0 else None

    def _close(self) -> None:
        """Close the sinks and release the run directory (idempotent)."""
        if self.logger is not None:
            self.logger.close()
        self.run_dir.close()

    # ------------------------------------------------------------------ checkpoints
    @property
    def _sharded(self) -> bool:
        """FSDP: the trainable tensors live in shards, and checkpoints are sharded (DCP) to match."""
        return self.parallel is not None and self.parallel.mode == "fsdp"

    def state_dict(self) -> dict:
        """What a checkpoint holds besides, under FSDP, the sharded tensors (:meth:`sharded_state_dict`): there
        the parameters, the optimiser moments and the proposal's weights are written by every rank (DCP);
        elsewhere they are here, whole. Either kind resumes at any world size and engine."""
        state = {
            "train_state": asdict(self.state),
            "rng": rng_states(self.generator),
            "config": to_dict(self.cfg),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.loss_fn.state_dict_extra(),
            "constraints": [c.state_dict() for c in self.target.constraints],
        }
        optimizer = self.optimizer.state_dict()
        proposal = None if self.proposal is None else self.proposal.state_dict()
        if self._sharded:
            first = next(iter(self.policy.trainable.values()))
            state.update(sharded=True, optimizer_param_groups=optimizer["param_groups"],
                         optimizer_moments=sorted(self.optimizer.state.get(first, {})),
                         proposal=None if proposal is None else {k: v for k, v in proposal.items() if k != "state"})
        else:
            state.update(trainable={n: p.detach().cpu().clone() for n, p in self.policy.trainable.items()},
                         optimizer=optimizer, proposal=proposal)
        return state

    def sharded_state_dict(self) -> dict:
        """Under FSDP, the tensors sharded across ranks, by trainable name (each rank holds its shards)."""
        trainable = self.policy.trainable
        state = {"trainable": {n: p.detach() for n, p in trainable.items()},
                 "optimizer": {n: dict(self.optimizer.state.get(p, {})) for n, p in trainable.items()}}
        if self.proposal is not None:
            state["proposal"] = dict(self.proposal.state)
        return state

    def load_state_dict(self, state: dict, path: Path | None = None) -> None:
        """Restore a checkpoint's ``state`` (and, for a sharded one, the shards in its directory ``path``)."""
        where = f"the checkpoint {path}" if path is not None else "the checkpoint"
        for change in check_config_changes(state.get("config"), to_dict(self.cfg), where, "trainer.resume=false"):
            say(f"resuming with a changed setting: {change}")
        if state.get("sharded"):
            self._load_sharded(state, path)
        else:
            self._load_whole(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_fn.load_state_dict_extra(state["loss"])
        for c, s in zip(self.target.constraints, state["constraints"], strict=True):
            c.load_state_dict(s)
        if "train_state" in state:
            self.state = TrainState(**state["train_state"])
        else:  # a checkpoint of fdiv_align ≤ 0.1.0 (the same fields at the top level)
            self.state = TrainState(state["step"], state["samples_seen"], state["base_eval"], bool(state.get("pending_eval")))
        restore_rng_states(state["rng"], self.generator)

    def _load_whole(self, state: dict) -> None:
        """Whole tensors into the parameters, optimiser and proposal (sharded as their parameter under FSDP)."""
        with torch.no_grad():
            for n, p in self.policy.trainable.items():
                p.copy_(shard_like(state["trainable"][n], p))
        self.optimizer.load_state_dict(state["optimizer"])
        for p in self.policy.trainable.values():
            moments = self.optimizer.state.get(p, {})
            for key, value in moments.items():
                moments[key] = shard_like(value, p)
        if self.proposal is not None:
            proposal = dict(state["proposal"])
            proposal["state"] = {n: shard_like(v, self.policy.trainable[n]) for n, v in proposal["state"].items()}
            self.proposal.load_state_dict(proposal)

    def _load_sharded(self, state: dict, path: Path) -> None:
        """A sharded checkpoint read by DCP into this run's layout (shards of any world size, or whole tensors)."""
        trainable = self.policy.trainable
        template = {"trainable": {n: p.detach() for n, p in trainable.items()},  # loaded in place
                    "optimizer": {n: {k: torch.zeros((), dtype=torch.float32) if k == "step" else torch.zeros_like(p)
                                      for k in state["optimizer_moments"]} for n, p in trainable.items()}}
        if self.proposal is not None:
            template["proposal"] = {n: torch.zeros_like(p) for n, p in trainable.items()}
        load_sharded(path, template)
        for n, p in trainable.items():
            if template["optimizer"][n]:
                self.optimizer.state[p] = template["optimizer"][n]
        for group, saved in zip(self.optimizer.param_groups, state["optimizer_param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.proposal is not None:
            self.proposal.load_state_dict({**state["proposal"], "state": template["proposal"]})

    def save(self) -> Path | None:
        """A checkpoint of the current state (every rank calls; the path on rank 0, None elsewhere)."""
        sharded = self.sharded_state_dict() if self._sharded else None
        return self.run_dir.save_checkpoint(self.step, self.state_dict(), self.cfg.trainer.keep_checkpoints, sharded)
