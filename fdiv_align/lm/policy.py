"""The policy πθ and its base a: one object that samples, scores and builds the surrogate.

:func:`prepare_policy` turns a loaded causal LM into a :class:`Policy`: placed on its device, with
the configured attention kernel, LoRA adapters (or full fine-tuning with a frozen copy of the base)
and the compute plan's precision (fdiv_align/lm/precision.py). The base distribution a(x|c) is the
policy with its adapters disabled (LoRA) or the frozen copy (full fine-tuning) —
:meth:`Policy.reference_logprobs`, the library's one implementation of log a, which targets use too
(:meth:`fdiv_align.targets.BaseLM.of_policy`).
"""

from __future__ import annotations

import copy

import torch

from .attention import register_grouped_eager
from ..config import ModelConfig
from .fast_lora import install_fast_lora_forward
from .logprobs import SamplingConfig
from .models import lora_wrap
from .precision import ComputePlan
from .batch import Batch
from .sampling import sample
from .scoring import score, weighted_logprob_sum

__all__ = ["Policy", "prepare_policy", "maybe_lora"]


class Policy:
    """πθ (``model``; ``trainable`` its parameters that train) and a (``reference_logprobs``).

    ``sampling`` is the sampling transform of πθ (a is always scored untransformed); the plan's
    ``autocast_dtype``/``head_dtype`` and ``compile`` apply to every pass. ``passes``: None (one process),
    or the callable each pass is handed to as ``passes(run, *args)`` — the data-parallel engine's root
    module (fdiv_align/training/distributed.py), whose hooks must see every pass.
    """

    def __init__(self, model, tokenizer, use_lora: bool, reference, sampling: SamplingConfig,
                 plan: ComputePlan):
        self.model, self.tokenizer, self.use_lora, self.reference = model, tokenizer, use_lora, reference
        self.sampling, self.plan = sampling, plan
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("nothing to train: no parameter requires grad (a PEFT config whose adapters are not "
                             "trainable, or a frozen model); check model.lora_target_modules")
        self.pad_id = tokenizer.pad_token_id
        self.passes = None

    def _run(self, run, *args, **kwargs):
        return run(*args, **kwargs) if self.passes is None else self.passes(run, *args, **kwargs)

    @torch.no_grad()
    def sample(self, contexts: list[str], context_index: torch.Tensor, uniforms: torch.Tensor, max_new_tokens: int,
               stop_at_eos: bool = True) -> Batch:
        """Samples of πθ (with the current weights) with log q recorded; see :func:`fdiv_align.lm.sampling.sample`."""
        self.model.eval()
        return self._run(sample, self.model, self.tokenizer, contexts, num_samples=0, max_new_tokens=max_new_tokens,
                         config=self.sampling, stop_at_eos=stop_at_eos, context_index=context_index, uniforms=uniforms,
                         plan=self.plan)

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """[N] log a(x|c): the base distribution (adapters disabled, or the frozen copy), untransformed, float64."""
        return self._run(self._reference_logprobs, batch).double().cpu()

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        if self.use_lora:
            try:
                with self.model.disable_adapter():
                    return score(self.model, batch, SamplingConfig(), pad_id=self.pad_id, plan=self.plan).sequence_logprobs
            finally:
                # PEFT's disable/enable toggles requires_grad on the adapter tensors registered at that moment;
                # under FSDP those are the gathered copies, not ``trainable`` (the sharded parameters)
                for p in self.trainable.values():
                    p.requires_grad_(True)
        return score(self.reference, batch, SamplingConfig(), pad_id=self.pad_id, plan=self.plan).sequence_logprobs

    def policy_logprobs(self, batch: Batch) -> torch.Tensor:
        """[N] log πθ(x|c) under the sampling transform; carries the graph in grad mode."""
        return self._run(score, self.model, batch, self.sampling, pad_id=self.pad_id, plan=self.plan).sequence_logprobs.float()

    def weighted_logprob_sum(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i weights_i · log πθ(x_i|c_i) as a differentiable scalar (the fused kernel makes its head
        gradients in the forward pass)."""
        return self._run(self._weighted_logprob_sum, batch, weights)  # a tensor out: the engines hook on it

    def _weighted_logprob_sum(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        return weighted_logprob_sum(self.model, batch, weights, self.sampling, pad_id=self.pad_id, plan=self.plan).total



def prepare_policy(model_cfg: ModelConfig, lm, device: torch.device, plan: ComputePlan, sampling: SamplingConfig) -> Policy:
    """A :class:`Policy` from a loaded LM (``lm.model``, ``lm.tokenizer``): device, attention kernel,
    LoRA or full fine-tuning, and the bf16 fast path when the plan says bf16."""
    model = lm.model
    _move_to_device(model, device)
    _set_attention(model, model_cfg.attn_implementation)
    model, use_lora = maybe_lora(model, model_cfg)
    reference = None
    if not use_lora:  # full fine-tuning: a frozen copy of the base serves as a(x)
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    if use_lora:
        install_fast_lora_forward(model)  # same sum as PEFT's forward in two ops (fast_lora.py)
        if plan.autocast_dtype is not None:
            _store_frozen_in(model, plan.autocast_dtype)
            _keep_adapter_inputs_in_compute_dtype(model)
    return Policy(model, lm.tokenizer, use_lora, reference, sampling, plan)


def _move_to_device(model, device: torch.device) -> None:
    """Put the model on ``device``; a quantised model must already be there (bitsandbytes weights
    cannot move), else a clear error."""
    where = {p.device for p in model.parameters()}
    if where == {device} or (device.type == "cuda" and device.index is None and {d.type for d in where} == {"cuda"}):
        return
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) \
            or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(f"the quantised model is on {sorted(map(str, where))} but model.device resolves to "
                         f"{device}; load it there (load_model(..., device=...))")
    model.to(device)


def maybe_lora(model, m: ModelConfig):
    """(model, use_lora): LoRA-wrapped when ``m.lora`` is true, or null and the model is larger than
    ``m.lora_threshold`` parameters or quantised; gradient checkpointing as ``m`` says."""
    n_params = sum(p.numel() for p in model.parameters())
    use_lora = m.lora if m.lora is not None else (n_params > m.lora_threshold or m.quantization is not None)
    if m.quantization is not None and not use_lora:
        raise ValueError("a quantised (4/8-bit) base can only be trained with LoRA: set model.lora=true")
    if hasattr(model, "peft_config"):  # already a PeftModel
        use_lora = True
    elif use_lora:
        model = lora_wrap(model, m)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if use_lora and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, use_lora


def _set_attention(model, wanted: str | None) -> None:
    """Apply ``model.attn_implementation`` (null: ``fdiv_grouped_eager`` on CPU — eager attention
    without repeat_kv copies (fdiv_align/lm/attention.py); for these short sequences eager beats sdpa's
    flash kernel here, docs/results/step_time_profile.md — and ``sdpa`` elsewhere)."""
    grouped = register_grouped_eager()
    if wanted is None:
        wanted = grouped if next(model.parameters()).device.type == "cpu" else "sdpa"
    if getattr(model.config, "_attn_implementation", None) == wanted:
        return
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, ImportError) as exc:
        raise ValueError(f"model.attn_implementation={wanted!r} is not available for {type(model).__name__}: {exc}") from exc


def _keep_adapter_inputs_in_compute_dtype(model) -> None:
    """Under bf16 autocast PEFT casts each LoRA layer's bf16 input up to the fp32 adapter dtype,
    and autocast casts it straight back to bf16 for the matmul: an exact round trip (bf16 ⊂ fp32)
    that costs two copies per adapter call (~14 per layer per decoding step). Skip it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def _store_frozen_in(model, dtype: torch.dtype) -> None:
    """bf16 fast path with LoRA: keep the frozen base *linear* weights in bf16 (the dtype autocast
    would cast them to on every call — autocast caches casts of trainable leaves only, so frozen
    weights were re-cast at every sampling step). Trainable adapters stay fp32 (master weights);
    embeddings, the output head and norms stay fp32, so logits and log-probs keep fp32 inputs."""
    head = model.get_output_embeddings()
    head_w = getattr(head, "weight", None)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
            if head_w is not None and module.weight is head_w:
                continue
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
