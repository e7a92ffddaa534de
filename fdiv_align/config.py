"""Structured configs (dataclasses) of the trainer and the Hydra CLI.

Each dataclass maps one-to-one to a Hydra config group under ``fdiv_align/conf/`` (``model``, ``divergence``,
``task``, ``trainer``, ``logger``). They are registered in Hydra's ConfigStore as the schema of
the root config, so that an unknown key — in a YAML file or on the command line — fails at
start with a message naming it. :func:`from_dict` gives the same check without Hydra.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Choice", "Quantization", "Schedule", "Optimizer", "Baseline", "Proposal", "ProposalCriterion", "Precision",
           "WandbMode", "ModelConfig", "DivergenceConfig", "TaskConfig", "TrainerConfig", "LoggerConfig", "Config", "PairTrainingConfig",
           "RewardModelConfig", "PreferenceOptConfig", "from_dict", "validate_pairs",
           "to_dict", "register_configs", "validate"]


class Choice(str, enum.Enum):
    """A config value from a fixed set; each member's name is its value. Members are their strings
    (``Schedule.linear == "linear"``; same hash, ``str()``, YAML and JSON), so a key may be given as a
    plain string: Hydra converts it (and rejects another value naming the valid ones), :func:`validate`
    does the same for configs built in Python."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:
        return str.__hash__(self)


#: bitsandbytes 4/8-bit base weights. Member names equal their values (Hydra converts by name), hence
#: the functional form for names that are not identifiers: ``Quantization["4bit"]``.
Quantization = Choice("Quantization", [("4bit", "4bit"), ("8bit", "8bit")])


class Schedule(Choice):
    constant = "constant"
    linear = "linear"  # decay to 0 at the last step


class Optimizer(Choice):
    adamw = "adamw"
    adamw8bit = "adamw8bit"  # bitsandbytes


class Baseline(Choice):
    none = "none"
    moving_average = "moving_average"
    constant = "constant"  # fkl: 1
    loo = "loo"


class Proposal(Choice):
    on = "on"  # q = πθ
    off = "off"  # frozen q, replaced when D(p‖π) < D(p‖q)


class ProposalCriterion(Choice):
    fkl = "fkl"
    tv = "tv"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Parallel(Choice):
    ddp = "ddp"  # torch DistributedDataParallel: every rank holds the whole model
    fsdp = "fsdp"  # FSDP2 fully_shard: parameters, gradients and optimiser state sharded across ranks


class Decode(Choice):
    dynamic = "dynamic"  # a KV cache grown by one column per step (transformers' DynamicCache)
    static = "static"  # a preallocated StaticCache: the same shapes every step
    captured = "captured"  # static, each step replayed as a CUDA graph (torch.compile mode="reduce-overhead")


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    #: ``smollm2-135m`` (embedded), ``tiny`` (random, tests), a local HF directory, or a hub id.
    name: str = "smollm2-135m"
    dtype: str = "float32"  # master weights; see trainer.precision for bf16 compute
    quantization: Optional[Quantization] = None  # null | 4bit | 8bit (bitsandbytes; LoRA required)
    #: LoRA: true, false, or null = automatic (LoRA when the model has more than lora_threshold parameters)
    lora: Optional[bool] = None
    lora_threshold: int = 50_000_000
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    #: ["all-linear"] (PEFT's convention: every linear layer but the output head, any architecture) or module names
    lora_target_modules: list = field(default_factory=lambda: ["all-linear"])
    gradient_checkpointing: bool = False
    #: attention kernel: ``fdiv_grouped_eager`` (eager without repeat_kv copies, fdiv_align/lm/attention.py) |
    #: ``eager`` | ``sdpa`` | any name transformers accepts; null = ``fdiv_grouped_eager`` on CPU (eager is
    #: faster here than sdpa's flash kernel for these short sequences, see docs/results/step_time_profile.md), ``sdpa`` elsewhere
    attn_implementation: Optional[str] = None
    seed: int = 0  # for ``tiny`` models
    #: where the model runs: null = ``cuda`` when a GPU is visible, else ``cpu``; or any torch device
    #: string (``cpu``, ``cuda``, ``cuda:1``). Log-space math and the estimators stay on the CPU in fp64.
    device: Optional[str] = None


@dataclass
class DivergenceConfig:
    name: str = "js"  # rkl | fkl | js | tv | alpha | chi2, or any name given to register_divergence
    #: keyword arguments of the divergence's class, checked by the registry (alpha: {alpha: 0.5})
    params: dict = field(default_factory=dict)
    #: for divergences infinite where P = 0 (rkl, chi2, alpha ≥ 1): floor on the scorers' log-score, so that
    #: log P = log a + max(log Φ, floor) (the trainer optimises towards that p_ε); null = refuse P = 0 samples
    log_phi_floor: Optional[float] = None


@dataclass
class TaskConfig:
    name: str = "sentiment"  # amazing | science | sentiment | female | code_compiles
    #: keyword arguments of the task's builder, checked by the task registry (get_task): sentiment
    #: {beta: 0.1} (P = a·exp(r/β)), female {target: 0.5} (target moment), code_compiles {num_contexts: 64}
    params: dict = field(default_factory=dict)  # {} = the builder's defaults (fdiv_align/conf/task/*.yaml state them)
    #: the task's prompts from a text file (a line each), a JSONL file or a `datasets` directory (save_to_disk)
    contexts: Optional[str] = None
    #: the JSONL / dataset column holding the prompt (null: the first of prompt, context, text, messages)
    prompt_column: Optional[str] = None
    #: render plain-string prompts as a user turn with the tokenizer's chat template (conversational prompts,
    #: lists of {role, content} messages, always are), with the generation prompt
    chat_template: bool = False
    max_new_tokens: Optional[int] = None  # override the task's length
    constraint_fit_samples: int = 512  # distributional tasks: proposal samples used to fit λ


@dataclass
class TrainerConfig:
    steps: int = 30
    samples_per_step: int = 16  # global batch (all processes)
    micro_batch_size: int = 16  # gradient accumulation when smaller than the per-process batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant  # after warmup
    optimizer: Optimizer = Optimizer.adamw
    max_grad_norm: Optional[float] = 1.0
    baseline: Baseline = Baseline.loo
    baseline_momentum: float = 0.9
    #: nats: advantages no larger than a log-ratio error of this size could cause are numerical noise and
    #: get coefficient 0 (FDivergenceLoss); 1e-4 is the measured agreement of sampled and rescored fp32
    #: log-probs (tests/test_smollm2.py). 0 = off (the plain estimator)
    logratio_resolution: float = 1e-4
    proposal: Proposal = Proposal.on
    proposal_update_every: int = 5  # off-policy: check every K steps
    proposal_criterion: ProposalCriterion = ProposalCriterion.fkl
    eval_every: int = 15
    eval_samples: int = 48
    eval_seed: int = 1234
    #: false = no step-0 evaluation of the base model (it is the same in every run of a task with the same
    #: eval_seed: a sweep evaluates the base once, in a ``steps: 0`` run — benchmarks/smollm2_sweep.sh)
    eval_at_start: bool = True
    eval_micro_batch_size: Optional[int] = None  # rows per evaluation sampling batch (null = micro_batch_size)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the newest valid checkpoint in the output dir
    seed: int = 0
    deterministic: bool = False
    stop_at_eos: bool = True
    temperature: float = 1.0  # sampling transform (1 = pure ancestral sampling, what f-DPG assumes)
    top_k: int = 0
    top_p: float = 1.0
    #: auto | fp32 | bf16: compute precision of the transformer body and output head (master weights
    #: stay fp32, log-space math fp64). auto = bf16 only where the device runs bf16 products natively
    #: (bf16 CUDA GPUs; CPUs with AVX-512 BF16/AMX and a measured bf16 GEMM faster than fp32), fp32
    #: otherwise — fdiv_align/lm/precision.py; the choice and its reason are printed and in summary.json.
    precision: Precision = Precision.auto
    #: under bf16: false = the output head's GEMMs in bf16 with fp32 logits (each row shifted inside
    #: the GEMM so that rounding is relative to the distance from its top/target logit; input rounding
    #: costs ~0.011 nats rms per token on SmolLM2, less than the bf16 body's 0.026 — benchmarks/head_precision.py),
    #: true = fp32 head GEMMs (≈4× slower head on CPU). Ignored under fp32 (head fp32).
    fp32_head: bool = False
    #: torch.compile for the fused kernels: null = auto (when inductor can build them: a C++ compiler on
    #: the CPU, triton on CUDA; eager otherwise, said at start), true = required, false = eager
    compile: Optional[bool] = None
    fused_logprobs: bool = True  # fused lm_head → log-prob kernel on the policy forward
    threads: Optional[int] = None  # torch threads (null = all cores)
    #: several processes (torchrun / accelerate launch): the engine that sums the gradients — ddp or fsdp
    #: (fdiv_align/training/distributed.py); ignored in one process
    parallel: Parallel = Parallel.ddp
    #: the sampler's decoding (fdiv_align/lm/sampling.py): dynamic | static | captured; null = auto (static on CUDA,
    #: dynamic on the CPU). captured needs CUDA and torch.compile; it was not yet measured on a GPU (issue 27)
    decode: Optional[Decode] = None


@dataclass
class LoggerConfig:
    progress: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "fdiv_align"
    log_samples: int = 8  # generated samples written at each evaluation


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: Optional[str] = None  # null: Hydra's run dir (CLI) or ./runs/<time> (API)


@dataclass
class PairTrainingConfig:
    """Training on preference pairs: ``fdiv-align-rm`` (reward model) and ``fdiv-align-po`` (offline f-DPO)."""

    data: Optional[str] = None  # preference JSONL (fdiv_align/preferences.py); required
    eval_fraction: float = 0.2  # held-out pairs (a seeded permutation of the file) for pairwise accuracy
    epochs: int = 2
    batch_size: int = 16  # pairs per step
    eval_batch_size: int = 32  # pairs per forward of the held-out evaluation (no gradients)
    eval_at_start: bool = True  # evaluate the held-out pairs before the first step (0.5 for a new head or π = π_ref)
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    checkpoint_every: int = 20  # steps; 0 = only the final state
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the newest valid checkpoint in the output dir
    threads: Optional[int] = None  # torch threads (null = all cores)
    progress: bool = True


@dataclass
class RewardModelConfig:
    """``fdiv-align-rm``: a Bradley–Terry reward model (fdiv_align/targets/reward_model.py) on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: PairTrainingConfig = field(default_factory=PairTrainingConfig)
    use_margin: bool = True  # −log σ(r_w − r_l − m) with the pairs' margins m where the file has them
    output_dir: Optional[str] = None


@dataclass
class PreferenceOptConfig:
    """``fdiv-align-po``: offline f-DPO (fdiv_align/objectives/preference_loss.py) of the model on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig(name="rkl"))
    training: PairTrainingConfig = field(default_factory=PairTrainingConfig)
    beta: float = 0.1
    output_dir: Optional[str] = None


def _build(cls, data: dict, path: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise TypeError(f"config {path or 'root'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KeyError(f"unknown config key(s) {', '.join(repr((path + '.' if path else '') + k) for k in unknown)}; "
                       f"valid keys of {path or 'root'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = {"ModelConfig": ModelConfig, "DivergenceConfig": DivergenceConfig, "TaskConfig": TaskConfig,
               "TrainerConfig": TrainerConfig, "LoggerConfig": LoggerConfig,
               "PairTrainingConfig": PairTrainingConfig}.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _build(sub, value, f"{path}.{name}" if path else name) if sub else value
    return cls(**kwargs)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(cfg: Config) -> None:
    """Every value check that needs no model, so that a bad value fails at once — before the model
    loads and before anything is written — with a message naming the key, the value and what is
    expected. (Names of divergences and tasks are checked by their registries.)"""
    _coerce_choices(cfg)
    t, m, d, k = cfg.trainer, cfg.model, cfg.divergence, cfg.task
    checks = [
        (isinstance(t.steps, int) and t.steps >= 0, f"trainer.steps must be an integer ≥ 0, got {t.steps!r}"),
        (t.samples_per_step >= 1, f"trainer.samples_per_step must be ≥ 1, got {t.samples_per_step!r}"),
        (t.micro_batch_size >= 1, f"trainer.micro_batch_size must be ≥ 1, got {t.micro_batch_size!r}"),
        (_finite(t.lr) and t.lr > 0, f"trainer.lr must be a finite number > 0, got {t.lr!r}"),
        (_finite(t.weight_decay) and t.weight_decay >= 0, f"trainer.weight_decay must be ≥ 0, got {t.weight_decay!r}"),
        (t.warmup_steps >= 0, f"trainer.warmup_steps must be ≥ 0, got {t.warmup_steps!r}"),
        (t.max_grad_norm is None or (_finite(t.max_grad_norm) and t.max_grad_norm > 0),
         f"trainer.max_grad_norm must be null or a number > 0, got {t.max_grad_norm!r}"),
        (_finite(t.temperature) and t.temperature > 0, f"trainer.temperature must be a finite number > 0, got {t.temperature!r}"),
        (isinstance(t.top_k, int) and t.top_k >= 0, f"trainer.top_k must be an integer ≥ 0 (0 = off), got {t.top_k!r}"),
        (_finite(t.top_p) and 0 < t.top_p <= 1, f"trainer.top_p must be in (0, 1] (1 = off), got {t.top_p!r}"),
        (_finite(t.baseline_momentum) and 0 <= t.baseline_momentum < 1,
         f"trainer.baseline_momentum must be in [0, 1), got {t.baseline_momentum!r}"),
        (_finite(t.logratio_resolution) and t.logratio_resolution >= 0,
         f"trainer.logratio_resolution must be a finite number ≥ 0, got {t.logratio_resolution!r}"),
        (t.proposal_update_every >= 1, f"trainer.proposal_update_every must be ≥ 1, got {t.proposal_update_every!r}"),
        (isinstance(t.fp32_head, bool), f"trainer.fp32_head must be true or false, got {t.fp32_head!r}"),
        (t.compile is None or isinstance(t.compile, bool), f"trainer.compile must be true, false or null (auto), got {t.compile!r}"),
        (isinstance(t.fused_logprobs, bool), f"trainer.fused_logprobs must be true or false, got {t.fused_logprobs!r}"),
        (t.eval_every >= 0, f"trainer.eval_every must be ≥ 0 (0 = no evaluation), got {t.eval_every!r}"),
        (t.eval_samples >= 1, f"trainer.eval_samples must be ≥ 1, got {t.eval_samples!r}"),
        (t.eval_micro_batch_size is None or t.eval_micro_batch_size >= 1,
         f"trainer.eval_micro_batch_size must be null or ≥ 1, got {t.eval_micro_batch_size!r}"),
        (t.steps != 0 or t.eval_at_start,
         "trainer.steps = 0 with trainer.eval_at_start = false would evaluate nothing: set one of them"),
        (t.checkpoint_every >= 0, f"trainer.checkpoint_every must be ≥ 0 (0 = none), got {t.checkpoint_every!r}"),
        (t.keep_checkpoints >= 1, f"trainer.keep_checkpoints must be ≥ 1, got {t.keep_checkpoints!r}"),
        (t.threads is None or t.threads >= 1, f"trainer.threads must be null or ≥ 1, got {t.threads!r}"),
        (m.lora_r >= 1, f"model.lora_r must be ≥ 1, got {m.lora_r!r}"),
        (d.log_phi_floor is None or _finite(d.log_phi_floor),
         f"divergence.log_phi_floor must be null or a finite number, got {d.log_phi_floor!r}"),
        (k.max_new_tokens is None or k.max_new_tokens >= 1, f"task.max_new_tokens must be null or ≥ 1, got {k.max_new_tokens!r}"),
        (k.constraint_fit_samples >= 1, f"task.constraint_fit_samples must be ≥ 1, got {k.constraint_fit_samples!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _choice_type(cls, name: str):
    """The :class:`Choice` subclass of field ``name`` of dataclass ``cls`` (``Optional`` unwrapped), or None."""
    hint = typing.get_type_hints(cls)[name]
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def _coerce_choices(cfg: Config) -> None:
    """Turn every choice given as a string into its :class:`Choice` member, in place; a value outside
    the set raises ``ValueError`` naming the key, the value and the valid ones."""
    for group in dataclasses.fields(cfg):
        section = getattr(cfg, group.name)
        if not dataclasses.is_dataclass(section):
            continue
        for f in dataclasses.fields(section):
            choice, value = _choice_type(type(section), f.name), getattr(section, f.name)
            if choice is None or value is None or isinstance(value, choice):
                continue
            try:
                setattr(section, f.name, choice(value))
            except ValueError:
                valid = ", ".join(m.value for m in choice)
                raise ValueError(f"{group.name}.{f.name} must be one of {valid}, got {value!r}") from None


def from_dict(data: dict | None, schema=Config):
    """``schema`` (default :class:`Config`) from a nested dict; unknown keys raise ``KeyError`` naming them."""
    return _build(schema, data or {}, "")


def validate_pairs(cfg: RewardModelConfig | PreferenceOptConfig) -> None:
    """The value checks of a pair-training config (and of its model section's choices)."""
    t = cfg.training
    checks = [
        (isinstance(t.data, str) and t.data != "", f"training.data must name a preference JSONL file, got {t.data!r}"),
        (_finite(t.eval_fraction) and 0 < t.eval_fraction < 1, f"training.eval_fraction must be in (0, 1), got {t.eval_fraction!r}"),
        (isinstance(t.epochs, int) and t.epochs >= 1, f"training.epochs must be an integer ≥ 1, got {t.epochs!r}"),
        (isinstance(t.batch_size, int) and t.batch_size >= 1, f"training.batch_size must be an integer ≥ 1, got {t.batch_size!r}"),
        (isinstance(t.eval_batch_size, int) and t.eval_batch_size >= 1,
         f"training.eval_batch_size must be an integer ≥ 1, got {t.eval_batch_size!r}"),
        (_finite(t.lr) and t.lr > 0, f"training.lr must be a finite number > 0, got {t.lr!r}"),
        (_finite(t.weight_decay) and t.weight_decay >= 0, f"training.weight_decay must be ≥ 0, got {t.weight_decay!r}"),
        (t.max_grad_norm is None or (_finite(t.max_grad_norm) and t.max_grad_norm > 0),
         f"training.max_grad_norm must be null or > 0, got {t.max_grad_norm!r}"),
        (isinstance(t.checkpoint_every, int) and t.checkpoint_every >= 0,
         f"training.checkpoint_every must be ≥ 0, got {t.checkpoint_every!r}"),
        (isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1,
         f"training.keep_checkpoints must be ≥ 1, got {t.keep_checkpoints!r}"),
        (t.threads is None or t.threads >= 1, f"training.threads must be null or ≥ 1, got {t.threads!r}"),
    ]
    if isinstance(cfg, PreferenceOptConfig):
        checks.append((_finite(cfg.beta) and cfg.beta > 0, f"beta must be a finite number > 0, got {cfg.beta!r}"))
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    _coerce_choices(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (dicts, lists, strings, numbers, None: choices as their strings), as JSON,
    YAML and a weights-only checkpoint hold it."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value):
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def register_configs() -> None:
    """Register :class:`Config` as Hydra's ``base_config`` schema."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="reward_model_config", node=RewardModelConfig)
    cs.store(name="preference_opt_config", node=PreferenceOptConfig)
