"""The one f-DPG training loop, for every divergence (docs/math.md; the run-safety contracts in docs/design.md).

One step: draw contexts and uniforms → sample x ∼ q with log q recorded (q = πθ on-policy, a
frozen copy otherwise) → log a(x) from the reference (the policy with LoRA adapters disabled, or a
frozen copy under full fine-tuning) → log P = log a + log Φ → update log Ẑ_c → coefficients
w(R − B) from :class:`~fdiv_align.loss.FDivergenceLoss` → policy log-probs with grad per
micro-batch, surrogate −Σ coefficient·log π / N, backward → clip, optimiser and LR step → metrics.

On-policy, the detached log π of the coefficients is the log q recorded while sampling (same
weights, so w ≡ 1 and no extra forward). Off-policy with one micro-batch, it is the detached
grad forward; with several micro-batches a no-grad forward over the batch comes first.

Data parallel (``torchrun``/``accelerate launch``, gloo on CPU): every process draws the same
contexts and uniforms and samples its slice of the global batch (sampling is by inverse CDF from
per-row uniforms, so the samples equal one process's); the per-sample vectors (log q, log P, log π,
context ids, alignment) are all-gathered so that Ẑ, baselines and metrics are computed on the
global batch identically everywhere; gradients of −Σ_local coefficient·log π / N_global are
summed across processes. The result equals one process with the same global batch and seed.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .attention import register_grouped_eager
from .checkpoint import list_checkpoints, load_latest, save_checkpoint
from .config import Config, to_dict, validate
from .divergences import get_divergence
from .estimators import estimate_divergences
from .fast_lora import install_fast_lora_forward
from .interrupts import RunInterrupted, stop_requests
from .logprobs import head_logprob_fn
from .loss import FDivergenceLoss
from .metrics import MetricsLogger, distinct_n, self_bleu
from .models import LoadedModel, load_model, resolve_device, tiny_model
from .precision import compute_plan
from .sampling import Batch, SamplingConfig, sample, score, weighted_logprob_sum
from .targets import BaseLM, load_contexts
from .targets.tasks import Task, get_task

__all__ = ["Trainer", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """The step's gradient is ±inf/NaN: the parameters were not updated (see the message for the cause)."""


def say(message: str) -> None:
    """One status line on stderr (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[fdiv-align] {message}", file=sys.stderr, flush=True)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


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
        get_divergence(cfg.divergence.name, **({"alpha": cfg.divergence.alpha} if cfg.divergence.name == "alpha" else {}))
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        self._seed_everything(tc.seed)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _dist() is None:
            from accelerate import PartialState

            PartialState()  # torchrun / accelerate launch: initialise the process group (gloo on CPU)
        dist = _dist()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
        self.output_dir = Path(output_dir or cfg.output_dir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks)

        self.device = resolve_device(cfg.model.device)
        self.plan = compute_plan(tc.precision, tc.compile, self.device)
        say(self.plan.describe())
        self.lm = lm if lm is not None else self._load_model()
        self._move_to_device(self.lm.model)
        # whatever loading consumed (a first-run materialisation initialises a model), the run's random
        # state — LoRA initialisation included — depends on the seed alone
        self._seed_everything(tc.seed)
        self.tokenizer = self.lm.tokenizer
        self._set_attention(self.lm.model)
        self.model, self.use_lora = self._maybe_lora(self.lm.model)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("nothing to train: no parameter requires grad (a PEFT config whose adapters are not "
                             "trainable, or a frozen model); check model.lora_target_modules")
        self.reference = None
        if not self.use_lora:  # full fine-tuning: a frozen copy of the base serves as a(x)
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

        self.task = task if task is not None else get_task(cfg.task.name, **self._task_kwargs())
        self.contexts = load_contexts(cfg.task.contexts) if cfg.task.contexts else list(self.task.contexts)
        if not self.contexts:
            raise ValueError(f"task {self.task.name!r} has an empty context list: give at least one context "
                             f"(task.contexts=<file>, or Task(contexts=[...]); '' is the unconditional context)")
        self.max_new_tokens = cfg.task.max_new_tokens or self.task.max_new_tokens
        self.target = self.task.target(BaseLM(self.model, self.tokenizer))
        self.sampling = SamplingConfig(tc.temperature, tc.top_k, tc.top_p)
        self.divergence = get_divergence(cfg.divergence.name, **({"alpha": cfg.divergence.alpha} if cfg.divergence.name == "alpha" else {}))
        baseline_kwargs = {"momentum": tc.baseline_momentum} if tc.baseline == "moving_average" else {}
        # the floor (if any) is applied to log Φ before the loss (see _floored_log_P), not to log P
        self.loss_fn = FDivergenceLoss(self.divergence, tc.baseline, None, num_contexts=len(self.contexts),
                                       logratio_resolution=tc.logratio_resolution or None, **baseline_kwargs)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.proposal_state = None
        if tc.proposal == "off":
            self.proposal_state = {n: p.detach().clone() for n, p in self.trainable.items()}
        self._offpolicy_acc = {"pi": [], "q": []}
        self.proposal_updates = 0
        # one precision decision for every path (fdiv_align/precision.py): body autocast dtype, and the
        # output head's GEMM dtype (None = fp32; fp32 logits either way, kernels/low_precision_head.py)
        self.autocast_dtype = self.plan.autocast_dtype
        self.head_dtype = self.plan.head_dtype(tc.fp32_head)
        if self.use_lora:
            install_fast_lora_forward(self.model)  # same sum as PEFT's forward in two ops (fast_lora.py)
        if self.autocast_dtype is not None and self.use_lora:
            self._store_frozen_in(self.autocast_dtype)
            self._keep_adapter_inputs_in_compute_dtype()
        self.logprob_fn = self._make_logprob_fn() if tc.fused_logprobs else None
        self.step = 0
        self.samples_seen = 0
        self.base_eval = None
        self.pending_eval = False  # the evaluation due at this step has not been logged yet
        self.logger = MetricsLogger(self.output_dir, cfg.logger.jsonl, cfg.logger if self.rank == 0 else None,
                                    to_dict(cfg)) if self.rank == 0 else None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _task_kwargs(self) -> dict:
        t = self.cfg.task
        return {"sentiment": {"beta": t.beta}, "female": {"target": t.target},
                "code_compiles": {"num_contexts": t.num_contexts}}.get(t.name, {})

    def _load_model(self) -> LoadedModel:
        m = self.cfg.model
        say(f"loading model {m.name} on {self.device}")
        if m.name == "tiny":
            return tiny_model(seed=m.seed, dtype=m.dtype)
        return load_model(m.name, dtype=m.dtype, quantization=m.quantization, device=self.device)

    def _move_to_device(self, model) -> None:
        """Put the model on ``self.device`` (``model.device``); a quantised model must already be there
        (bitsandbytes weights cannot move), else a clear error."""
        where = {p.device for p in model.parameters()}
        if where == {self.device} or (self.device.type == "cuda" and self.device.index is None
                                      and {d.type for d in where} == {"cuda"}):
            return
        if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) \
                or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError(f"the quantised model is on {sorted(map(str, where))} but model.device resolves to "
                             f"{self.device}; load it there (load_model(..., device=...))")
        model.to(self.device)

    def _maybe_lora(self, model):
        m = self.cfg.model
        n_params = sum(p.numel() for p in model.parameters())
        use_lora = m.lora if m.lora is not None else (n_params > m.lora_threshold or m.quantization is not None)
        if m.quantization is not None and not use_lora:
            raise ValueError("a quantised (4/8-bit) base can only be trained with LoRA: set model.lora=true")
        if hasattr(model, "peft_config"):  # already a PeftModel
            use_lora = True
        elif use_lora:
            from peft import LoraConfig, get_peft_model

            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in m.lora_target_modules if t in present]
            if not targets:
                raise ValueError(f"model.lora_target_modules {list(m.lora_target_modules)} match no module of "
                                 f"{type(model).__name__}: LoRA would train nothing")
            model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if use_lora and hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        return model, use_lora

    def _set_attention(self, model) -> None:
        """Apply ``model.attn_implementation`` (null: ``fdiv_grouped_eager`` on CPU — eager attention
        without repeat_kv copies (fdiv_align/attention.py); for these short sequences eager beats sdpa's
        flash kernel here, docs/results/step_time_profile.md — and ``sdpa`` elsewhere)."""
        wanted = self.cfg.model.attn_implementation
        grouped = register_grouped_eager()
        if wanted is None:
            wanted = grouped if next(model.parameters()).device.type == "cpu" else "sdpa"
        if getattr(model.config, "_attn_implementation", None) == wanted:
            return
        try:
            model.set_attn_implementation(wanted)
        except (ValueError, ImportError) as exc:
            raise ValueError(f"model.attn_implementation={wanted!r} is not available for {type(model).__name__}: {exc}") from exc

    def _keep_adapter_inputs_in_compute_dtype(self) -> None:
        """Under bf16 autocast PEFT casts each LoRA layer's bf16 input up to the fp32 adapter dtype,
        and autocast casts it straight back to bf16 for the matmul: an exact round trip (bf16 ⊂ fp32)
        that costs two copies per adapter call (~14 per layer per decoding step). Skip it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False

    def _store_frozen_in(self, dtype: torch.dtype) -> None:
        """bf16 fast path with LoRA: keep the frozen base *linear* weights in bf16 (the dtype autocast
        would cast them to on every call — autocast caches casts of trainable leaves only, so frozen
        weights were re-cast at every sampling step). Trainable adapters stay fp32 (master weights);
        embeddings, the output head and norms stay fp32, so logits and log-probs keep fp32 inputs."""
        head = self.model.get_output_embeddings()
        head_w = getattr(head, "weight", None)
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
                if head_w is not None and module.weight is head_w:
                    continue
                module.weight.data = module.weight.data.to(dtype)
                if module.bias is not None and not module.bias.requires_grad:
                    module.bias.data = module.bias.data.to(dtype)

    def _make_optimizer(self):
        tc = self.cfg.trainer
        params = list(self.trainable.values())
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

    def _make_logprob_fn(self):
        return head_logprob_fn(allow_fallback=False, compile=self.plan.compile, head_dtype=self.head_dtype)

    # ------------------------------------------------------------------ model passes
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _proposal_weights(self):
        """Temporarily load the frozen proposal's weights into the trainable parameters (off-policy)."""
        if self.proposal_state is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.trainable.items()}
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.proposal_state[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])

    @torch.no_grad()
    def base_logprobs(self, batch: Batch) -> torch.Tensor:
        """[N] log a(x|c), pure base distribution (no sampling transform), float64."""
        with self._autocast():
            if self.use_lora:
                with self.model.disable_adapter():
                    lp = score(self.model, batch, SamplingConfig(), pad_id=self.tokenizer.pad_token_id, logprob_fn=self.logprob_fn,
                               head_dtype=self.head_dtype)[1]
            else:
                lp = score(self.reference, batch, SamplingConfig(), pad_id=self.tokenizer.pad_token_id, logprob_fn=self.logprob_fn,
                           head_dtype=self.head_dtype)[1]
        return lp.double().cpu()

    def policy_logprobs(self, batch: Batch) -> torch.Tensor:
        """[N] log πθ(x|c) under the sampling transform; carries the graph in grad mode."""
        with self._autocast():
            return score(self.model, batch, self.sampling, pad_id=self.tokenizer.pad_token_id, logprob_fn=self.logprob_fn,
                         head_dtype=self.head_dtype)[1].float()

    def _floored_log_P(self, scores) -> torch.Tensor:
        """log P for the loss. With ``divergence.log_p_floor`` set, the floor applies to the scorers'
        log-score relative to the base: log P = log a + max(log Φ, floor), i.e. P ≥ e^floor·a(x) — the
        surrogate target p_ε the trainer then optimises (an absolute floor on log P would rank a
        violating sequence above a satisfying one whenever log a < floor, as it is for most texts)."""
        floor = self.cfg.divergence.log_p_floor
        if floor is None:
            return scores.log_P
        return scores.log_a + scores.log_phi.clamp_min(float(floor))

    def policy_loss(self, batch: Batch, coefficients: torch.Tensor, n_total: int) -> torch.Tensor:
        """The surrogate −Σ_i coefficient_i · log πθ(x_i) / N for (a micro-batch of) the step's samples."""
        with self._autocast():
            total, _ = weighted_logprob_sum(self.model, batch, -coefficients / n_total, self.sampling,
                                            pad_id=self.tokenizer.pad_token_id, fused=self.cfg.trainer.fused_logprobs,
                                            head_dtype=self.head_dtype, compile=self.plan.compile)
        return total

    def _sample(self, context_index: torch.Tensor, uniforms: torch.Tensor, proposal: bool = True) -> Batch:
        self.model.eval()
        with torch.no_grad(), (self._proposal_weights() if proposal else contextlib.nullcontext()):
            return sample(self.model, self.tokenizer, self.contexts, 0, self.max_new_tokens, self.sampling,
                          self.cfg.trainer.stop_at_eos, context_index=context_index, uniforms=uniforms,
                          autocast_dtype=self.autocast_dtype, head_dtype=self.head_dtype)

    # ------------------------------------------------------------------ distributed helpers
    def _shard(self, n: int) -> slice:
        per = math.ceil(n / self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        dist = _dist()
        if dist is None:
            return x
        parts = [None] * self.world
        dist.all_gather_object(parts, x.detach().cpu())
        return torch.cat(parts)

    def _gather_list(self, xs: list) -> list:
        dist = _dist()
        if dist is None:
            return xs
        parts = [None] * self.world
        dist.all_gather_object(parts, xs)
        return [x for part in parts for x in part]

    def _allreduce_grads(self):
        dist = _dist()
        if dist is None:
            return
        for p in self.trainable.values():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    # ------------------------------------------------------------------ one step
    def fit_constraints(self):
        """Fit λ of the distributional constraints on samples of the initial policy (= the base)."""
        constraints = self.target.constraints
        if not constraints:
            return None
        n = self.cfg.task.constraint_fit_samples
        g = torch.Generator().manual_seed(self.cfg.trainer.seed + 7919)
        ctx = torch.randint(len(self.contexts), (n,), generator=g)
        U = torch.rand((n, self.max_new_tokens), generator=g, dtype=torch.float64)
        texts, contexts, log_a, log_q = [], [], [], []
        for i in range(0, n, self.cfg.trainer.micro_batch_size):
            sl = slice(i, min(n, i + self.cfg.trainer.micro_batch_size))
            batch = self._sample(ctx[sl], U[sl])
            texts += batch.texts
            contexts += batch.context_texts
            log_a.append(self.base_logprobs(batch))
            log_q.append(batch.logq.double())
        fits = {}
        for c in constraints:
            fit = c.fit(texts, contexts, torch.cat(log_a), torch.cat(log_q))
            fits[c.name] = {"lambdas": fit.lambdas.tolist(), "achieved": fit.achieved.tolist(), "targets": fit.targets.tolist(),
                            "iterations": fit.iterations, "ess": fit.ess}
        return fits

    def _abortable(self, stops, phase: str):
        """Single process: ``stops.abortable(phase)``. Data parallel: not abortable (a process leaving
        mid-step would leave the others waiting in a collective), so the step finishes first."""
        if stops is None or self.world > 1:
            return contextlib.nullcontext()
        return stops.abortable(phase)

    def train_step(self, stops=None) -> dict:
        """One f-DPG step. Sampling and scoring (everything before the loss updates Ẑ and the baseline)
        may be abandoned by a stop signal (``RunInterrupted``), leaving no trace but the generator's draws."""
        tc = self.cfg.trainer
        t0 = time.perf_counter()
        N, T = tc.samples_per_step, self.max_new_tokens
        with self._abortable(stops, f"sampling and scoring of step {self.step + 1}"):
            ctx_all = torch.randint(len(self.contexts), (N,), generator=self.generator)
            U_all = torch.rand((N, T), generator=self.generator, dtype=torch.float64)
            sl = self._shard(N)
            batch = self._sample(ctx_all[sl], U_all[sl])
            t_sample = time.perf_counter()
            log_a = self.base_logprobs(batch)
            scores = self.target.log_scores(batch, log_a)
            scores_log_P = self._floored_log_P(scores)
            alignment = scores.alignment
            log_q = batch.logq.double()
            t_score = time.perf_counter()

        self.model.train()
        micro = [torch.arange(len(batch))[i:i + tc.micro_batch_size] for i in range(0, len(batch), tc.micro_batch_size)]
        if self.proposal_state is None:
            log_pi = log_q  # on-policy: π = q, recorded at sampling
        else:  # off-policy: the coefficients need log π before the gradient pass
            with torch.no_grad():
                log_pi = torch.cat([self.policy_logprobs(batch.select(m)).double().cpu() for m in micro])

        g_log_pi, g_log_q, g_log_P = self._gather(log_pi), self._gather(log_q), self._gather(scores_log_P)
        g_ctx, g_log_a, g_align = self._gather(batch.context_index), self._gather(log_a), self._gather(alignment)
        out = self.loss_fn(g_log_pi, g_log_q, g_log_P, g_ctx)
        coef = out.coefficients[sl].to(torch.float32)

        self.optimizer.zero_grad(set_to_none=True)
        for m in micro:
            self.policy_loss(batch.select(m), coef[m], N).backward()
        self._allreduce_grads()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), tc.max_grad_norm or math.inf))
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
            "loss": float(-(out.coefficients * g_log_pi).mean()),
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
        for key, e in est.items():
            record[key] = e.value
            if key not in ("alignment",):
                record[key + "_se"] = e.stderr
        if self.proposal_state is not None:
            self._offpolicy_check(g_log_pi, g_log_q, g_log_P, log_z, known, record)
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
                f"higher divergence.log_p_floor.")

    def _offpolicy_check(self, log_pi, log_q, log_P, log_z, known, record):
        """GDC++: every K steps replace q by πθ when the estimated D(p‖πθ) < D(p‖q) (both on q's samples)."""
        tc = self.cfg.trainer
        if known.any():
            lz = torch.where(known, log_z, torch.zeros_like(log_z))
            log_v = log_P - lz - log_q  # p/q
            v = torch.exp(log_v)
            if tc.proposal_criterion == "fkl":
                d_pi = torch.where(v > 0, v * (log_P - lz - log_pi), torch.zeros_like(v)).mean()
                d_q = torch.where(v > 0, v * log_v, torch.zeros_like(v)).mean()
            else:
                d_pi = 0.5 * (torch.exp(log_pi - log_q) - v).abs().mean()
                d_q = 0.5 * (1 - v).abs().mean()
            self._offpolicy_acc["pi"].append(float(d_pi))
            self._offpolicy_acc["q"].append(float(d_q))
        if self.step % tc.proposal_update_every == 0 and self._offpolicy_acc["pi"]:
            d_pi, d_q = np.mean(self._offpolicy_acc["pi"]), np.mean(self._offpolicy_acc["q"])
            record["proposal_d_pi"], record["proposal_d_q"] = float(d_pi), float(d_q)
            if d_pi < d_q:
                self.proposal_state = {n: p.detach().clone() for n, p in self.trainable.items()}
                self.proposal_updates += 1
            self._offpolicy_acc = {"pi": [], "q": []}
        record["proposal_updates"] = self.proposal_updates

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[dict, dict]:
        """Fixed evaluation sample: the same uniforms and contexts every time (seed ``eval_seed``),
        drawn from the current policy; IS estimates with q = π and the current Ẑ."""
        tc = self.cfg.trainer
        g = torch.Generator().manual_seed(tc.eval_seed)
        M = tc.eval_samples
        ctx = torch.arange(M) % len(self.contexts)
        U = torch.rand((M, self.max_new_tokens), generator=g, dtype=torch.float64)
        sl = self._shard(M)
        batches, log_a, log_P, align = [], [], [], []
        for i in range(sl.start, sl.stop, tc.micro_batch_size):
            j = slice(i, min(sl.stop, i + tc.micro_batch_size))
            b = self._sample(ctx[j], U[j], proposal=False)
            la = self.base_logprobs(b)
            batches.append(b)
            log_a.append(la)
            scores = self.target.log_scores(b, la)
            log_P.append(self._floored_log_P(scores))
            align.append(scores.alignment)
        log_pi = self._gather(torch.cat([b.logq.double() for b in batches]))
        log_a, log_P, align = self._gather(torch.cat(log_a)), self._gather(torch.cat(log_P)), self._gather(torch.cat(align))
        texts = self._gather_list([t for b in batches for t in b.texts])
        contexts = self._gather_list([c for b in batches for c in b.context_texts])
        lengths = self._gather(torch.cat([b.mask.sum(-1) for b in batches]))
        log_z, known = self.loss_fn.log_z.log_z(ctx)
        record = {"kind": "eval", "alignment": float(align.mean()), "alignment_se": float(align.std() / math.sqrt(M)),
                  "kl_pi_a": float((log_pi - log_a).mean()), "kl_pi_a_se": float((log_pi - log_a).std() / math.sqrt(M)),
                  "entropy": float(-log_pi.mean()),
                  "entropy_per_token": float(-log_pi.sum() / lengths.sum()),
                  "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "distinct_3": distinct_n(texts, 3),
                  "self_bleu_3": self_bleu(texts, 3), "samples_seen": self.samples_seen}
        if known.all():
            est = estimate_divergences(log_pi, log_pi, log_P, log_z)
            for key in ("kl_p_pi", "kl_pi_p", "js", "tv"):
                record[key], record[key + "_se"] = est[key].value, est[key].stderr
        return record, {"texts": texts, "contexts": contexts, "alignment": align.tolist()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "config": to_dict(self.cfg),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "proposal": self.proposal_state,
            "proposal_updates": self.proposal_updates,
            "offpolicy_acc": self._offpolicy_acc,
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
            for n, p in self.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.proposal_state = state["proposal"]
        self.proposal_updates = state["proposal_updates"]
        self._offpolicy_acc = state["offpolicy_acc"]
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

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict):
        if self.logger is not None:
            self.logger.log(self.step, record)

    def _eval_and_log(self, bar=None):
        record, samples = self.evaluate()
        self._log(record)
        if self.logger is not None and self.cfg.logger.log_samples:
            k = self.cfg.logger.log_samples
            self.logger.log_samples(self.step, samples["texts"][:k], samples["contexts"][:k], samples["alignment"][:k])
        return record

    def _resume(self) -> bool:
        """Load the newest intact checkpoint (True), or find none (False). Checkpoints that all fail
        verification stop the run (CorruptCheckpointsError): starting over would silently discard them."""
        resumed = load_latest(self.output_dir / "checkpoints")
        if resumed is None:
            return False
        step, state, path = resumed
        self.load_state_dict(state)
        if self.logger is not None:
            self.logger.truncate_after(self.step)
        say(f"resumed from {path} (step {self.step} of {self.cfg.trainer.steps})")
        return True

    def _set_aside_previous_run(self) -> None:
        """A fresh start in a directory that holds an earlier run's files (trainer.resume=false): move
        them to ``superseded-<time>/`` so that nothing is deleted and no record is mixed with this run's."""
        if self.rank != 0:
            return
        old = [self.output_dir / n for n in ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json")]
        old = [p for p in old if p.exists()]
        if not old:
            return
        aside = self.output_dir / f"superseded-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        aside.mkdir()
        for p in old:
            os.replace(p, aside / p.name)
        say(f"starting over (trainer.resume=false): the earlier run's {', '.join(p.name for p in old)} moved to {aside}")

    @staticmethod
    def _postfix(record: dict) -> dict:
        """Progress-bar fields: IS estimates shown as value±standard error (they are noisy, and may be
        negative where the true divergence is ≥ 0)."""
        out = {"align": f"{record['alignment']:.3f}"}
        for key in ("kl_p_pi", "kl_pi_a"):
            if key in record:
                out[key] = f"{record[key]:.2f}±{record.get(key + '_se', float('nan')):.2f}"
        out["samp/s"] = f"{record['samples_per_second']:.1f}"
        return out

    def train(self) -> dict:
        """Run to ``trainer.steps`` (resuming from the newest checkpoint) and return the summary.

        SIGINT/SIGTERM (:mod:`fdiv_align.interrupts`): during sampling, scoring or an evaluation the
        work in flight is abandoned at once; during an update the step is finished first. Then the
        state of the last completed step is checkpointed and ``{"status": "interrupted", ...}`` is
        returned; rerunning in the same output directory continues exactly. A second signal exits at once.
        """
        with stop_requests() as stops:
            return self._train(stops)

    def _train(self, stops) -> dict:
        tc = self.cfg.trainer
        t_start = time.perf_counter()
        done = self.output_dir / "summary.json"
        if tc.resume and done.exists():
            previous = json.loads(done.read_text())
            if previous.get("status") == "finished" and previous.get("steps") == tc.steps:
                return previous  # a finished run (e.g. a resumed sweep): nothing to redo
        fits = None
        interrupted = None
        if not (tc.resume and self._resume()):
            self._set_aside_previous_run()
            if self.plan.compile:
                say("compiling the fused log-prob kernels with torch.compile (first run only; then cached)")
            try:
                with stops.abortable("the base evaluation"):
                    fits = self.fit_constraints()
                    if fits:
                        self._log({"kind": "constraint_fit", **{f"{k}/{m}": v for k, d in fits.items() for m, v in d.items()}})
                    self.base_eval = self._eval_and_log()
            except RunInterrupted as exc:
                say(f"interrupted during {exc.phase}: no step was taken, nothing to save")
                if self.logger is not None:
                    self.logger.close()
                return {"status": "interrupted", "step": 0, "signal": exc.signum, "saved": False}
        bar = None
        if self.cfg.logger.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc=f"f-DPG {self.divergence.name}", dynamic_ncols=True)
        last_eval = self.base_eval
        try:
            if self.pending_eval:  # an evaluation interrupted before the last checkpoint: redo it first
                last_eval = self._abortable_eval(stops)
            while self.step < tc.steps and not stops.requested:
                rng = (self.generator.get_state(), torch.get_rng_state())
                try:
                    record = self.train_step(stops)
                except RunInterrupted:  # sampling/scoring abandoned: the step never happened
                    self.generator.set_state(rng[0])
                    torch.set_rng_state(rng[1])
                    break
                self._log(record)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    self.pending_eval = True
                    last_eval = self._abortable_eval(stops)
                for cb in self.callbacks:
                    cb(self, self.step, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self._postfix(record))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and not stops.requested:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if stops.requested:
            interrupted = stops.signum
            path = self.save()
            say(f"stopped at step {self.step}; checkpoint {path}")
            if self.logger is not None:
                self.logger.close()
            return {"status": "interrupted", "step": self.step, "signal": int(interrupted), "saved": True}
        final = self._eval_and_log() if tc.steps > 0 else last_eval
        if tc.checkpoint_every:
            self.save()
        log_z, known = self.loss_fn.log_z.log_z(torch.arange(self.loss_fn.log_z.num_contexts))
        warn = []
        if tc.steps > 0 and not known.any():
            warn.append(f"no sample in {self.samples_seen} had P > 0 (every target score was 0): Z is unknown and the "
                        f"policy was never updated; the target may be unreachable from the base model")
        for w in warn:
            say(f"warning: {w}")
        summary = {"status": "finished", "steps": self.step, "samples_seen": self.samples_seen,
                   "divergence": self.divergence.name, "task": self.task.name, "model": self.cfg.model.name,
                   "lora": self.use_lora, "seed": tc.seed, "base": self.base_eval, "final": final,
                   "constraint_fit": fits, "compute": self.plan.as_dict(), "warnings": warn,
                   "config": to_dict(self.cfg), "wall_seconds_this_run": time.perf_counter() - t_start}
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, default=float))
        if self.logger is not None:
            self.logger.close()
        return summary

    def _abortable_eval(self, stops):
        """The evaluation at this step; if a stop signal abandons it, it stays pending in the checkpoint
        and is redone first on resume."""
        try:
            with stops.abortable(f"the evaluation at step {self.step}"):
                record = self._eval_and_log()
        except RunInterrupted:
            return None
        self.pending_eval = False
        return record


def _json_safe(obj):
    """NaN/±inf → None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
