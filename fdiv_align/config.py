"""Structured configs (dataclasses) of the trainer and the Hydra CLI.

Each dataclass maps one-to-one to a Hydra config group under ``conf/`` (``model``, ``divergence``,
``task``, ``trainer``, ``logger``). They are registered in Hydra's ConfigStore as the schema of
the root config, so that an unknown key — in a YAML file or on the command line — fails at
start with a message naming it. :func:`from_dict` gives the same check without Hydra.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["ModelConfig", "DivergenceConfig", "TaskConfig", "TrainerConfig", "LoggerConfig", "Config", "from_dict",
           "to_dict", "register_configs"]


@dataclass
class ModelConfig:
    #: ``smollm2-135m`` (embedded), ``tiny`` (random, tests), a local HF directory, or a hub id.
    name: str = "smollm2-135m"
    dtype: str = "float32"  # master weights; see trainer.autocast for bf16 compute
    quantization: Optional[str] = None  # None | 4bit | 8bit (bitsandbytes; LoRA required)
    #: LoRA: true, false, or null = automatic (LoRA when the model has more than lora_threshold parameters)
    lora: Optional[bool] = None
    lora_threshold: int = 50_000_000
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    gradient_checkpointing: bool = False
    #: attention kernel: ``fdiv_grouped_eager`` (eager without repeat_kv copies, fdiv_align/attention.py) |
    #: ``eager`` | ``sdpa`` | any name transformers accepts; null = ``fdiv_grouped_eager`` on CPU (eager is
    #: faster here than sdpa's flash kernel for these short sequences, see docs/results/step_time_profile.md), ``sdpa`` elsewhere
    attn_implementation: Optional[str] = None
    seed: int = 0  # for ``tiny`` models
    #: where the model runs: null = ``cuda`` when a GPU is visible, else ``cpu``; or any torch device
    #: string (``cpu``, ``cuda``, ``cuda:1``). Log-space math and the estimators stay on the CPU in fp64.
    device: Optional[str] = None


@dataclass
class DivergenceConfig:
    name: str = "js"  # rkl | fkl | js | tv | alpha | chi2
    alpha: float = 0.5  # used by ``alpha`` only
    #: for divergences infinite where P = 0 (rkl, chi2, alpha ≥ 1): floor on the scorers' log-score, so that
    #: log P = log a + max(log Φ, floor) (the trainer optimises towards that p_ε); null = refuse P = 0 samples
    log_p_floor: Optional[float] = None


@dataclass
class TaskConfig:
    name: str = "sentiment"  # amazing | science | sentiment | female | code_compiles
    beta: float = 0.1  # sentiment: P = a·exp(r/β)
    target: float = 0.5  # female: target moment
    contexts: Optional[str] = None  # a text/JSONL file of contexts overriding the task's own
    max_new_tokens: Optional[int] = None  # override the task's length
    num_contexts: int = 64  # code_compiles: how many stdlib signatures
    constraint_fit_samples: int = 512  # distributional tasks: proposal samples used to fit λ


@dataclass
class TrainerConfig:
    steps: int = 30
    samples_per_step: int = 32  # global batch (all processes)
    micro_batch_size: int = 32  # gradient accumulation when smaller than the per-process batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear (decay to 0 at the last step), after warmup
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    max_grad_norm: Optional[float] = 1.0
    baseline: str = "loo"  # none | moving_average | constant (fkl: 1) | loo
    baseline_momentum: float = 0.9
    proposal: str = "on"  # on (q = πθ) | off (frozen q, replaced when D(p‖π) < D(p‖q))
    proposal_update_every: int = 5  # off-policy: check every K steps
    proposal_criterion: str = "fkl"  # fkl | tv
    eval_every: int = 10
    eval_samples: int = 64
    eval_seed: int = 1234
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the newest valid checkpoint in the output dir
    seed: int = 0
    deterministic: bool = False
    stop_at_eos: bool = True
    temperature: float = 1.0  # sampling transform (1 = pure ancestral sampling, what f-DPG assumes)
    top_k: int = 0
    top_p: float = 1.0
    #: bfloat16 | none: compute dtype of the transformer body (master weights stay fp32).
    #: bf16 moves sequence log-probs by ~0.1–0.5 nats (SmolLM2, 40 tokens), so fp32 is the default.
    autocast: str = "none"
    #: under autocast: false = the output head's GEMMs in bf16 with fp32 logits (each row shifted inside
    #: the GEMM so that rounding is relative to the distance from its top/target logit; input rounding
    #: costs ~0.011 nats rms per token on SmolLM2, less than the bf16 body's 0.026 — benchmarks/head_precision.py),
    #: true = fp32 head GEMMs (≈4× slower head on CPU). Ignored without autocast (head fp32).
    fp32_head: bool = False
    fused_logprobs: bool = True  # fused lm_head → log-prob kernel on the policy forward
    threads: Optional[int] = None  # torch threads (null = all cores)


@dataclass
class LoggerConfig:
    progress: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_mode: str = "offline"  # offline | online | disabled
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
               "TrainerConfig": TrainerConfig, "LoggerConfig": LoggerConfig}.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _build(sub, value, f"{path}.{name}" if path else name) if sub else value
    return cls(**kwargs)


def from_dict(data: dict | None) -> Config:
    """Config from a nested dict; unknown keys raise ``KeyError`` naming them."""
    return _build(Config, data or {}, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def register_configs() -> None:
    """Register :class:`Config` as Hydra's ``base_config`` schema."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
