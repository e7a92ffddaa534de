"""Taking the aligned model home: a Hugging Face directory that ``from_pretrained``, PEFT, vLLM or a
``pipeline`` load, in safetensors only.

:func:`save_final_model` writes, atomically (fdiv_align/files.py), the policy πθ as

* a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) when it was trained
  with LoRA — ``PeftModel.from_pretrained(base, dir)`` — unless ``merge``;
* a full model directory (``config.json``, ``model.safetensors``) otherwise, or with ``merge`` (the
  adapters folded into the base weights: a plain ``AutoModelForCausalLM``), in fp32;

each with the tokenizer and a ``generation_config.json`` holding the sampling transform the policy was
trained under (temperature, top-k, top-p), so that ``generate(do_sample=True)`` samples the trained π.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..files import atomic_path
from .fast_lora import uninstall_fast_lora_forward
from .policy import Policy

__all__ = ["save_final_model", "FINAL_MODEL_DIR"]

#: the name of the exported model in a run directory
FINAL_MODEL_DIR = "final_model"


def save_final_model(policy: Policy, out_dir: str | os.PathLike, merge: bool = False) -> Path:
    """Write πθ of ``policy`` to ``out_dir`` (see the module docstring); returns ``out_dir``."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    sampling = policy.sampling
    generation = GenerationConfig(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                                  top_p=sampling.top_p, bos_token_id=policy.tokenizer.bos_token_id,
                                  eos_token_id=policy.tokenizer.eos_token_id, pad_token_id=policy.tokenizer.pad_token_id)
    with atomic_path(out_dir, directory=True) as tmp:
        if policy.use_lora and not merge:
            policy.model.save_pretrained(tmp, safe_serialization=True)
        else:
            _plain_model(policy).save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
    return out_dir


def _plain_model(policy: Policy):
    """A standalone fp32 copy of πθ with the library's attention kernel replaced by transformers' own
    (``sdpa``; the saved config must load where fdiv_align is not installed)."""
    model = copy.deepcopy(policy.model).float()  # fp32 first: frozen weights kept in bf16 merge without loss
    if policy.use_lora:
        uninstall_fast_lora_forward(model)
        model = model.merge_and_unload()
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    return model.eval()
