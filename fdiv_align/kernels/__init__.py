"""Fused lm_head → token log-prob kernels (see :mod:`.token_logprobs`) and their integration."""

from __future__ import annotations

import torch

from .low_precision_head import low_precision_weight, shifted_head_logits
from .token_logprobs import (
    compile_count,
    default_chunk_size,
    default_vocab_tile,
    reference_token_logprobs,
    token_logprobs,
    weighted_token_logprob_sum,
)

__all__ = ["token_logprobs", "reference_token_logprobs", "weighted_token_logprob_sum", "default_chunk_size",
           "default_vocab_tile", "compile_count", "head_logprob_fn", "head_inputs", "low_precision_weight", "shifted_head_logits", "plain_linear_head", "fused_head_weights"]


def head_inputs(hidden: torch.Tensor, weight: torch.Tensor, head_dtype: torch.dtype | None):
    """(hidden, weight) in the head's compute dtype: fp32 (None), or a low-precision dtype with the
    weight's cast cached while the weight is unchanged."""
    dtype = head_dtype or torch.float32
    w = weight.float() if dtype == torch.float32 else low_precision_weight(weight, dtype)
    return hidden.to(dtype), w


def plain_linear_head(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a plain ``nn.Linear`` output head; TypeError for anything else (a PEFT-wrapped
    head, a custom module), since the kernel would silently skip what that module does."""
    if type(head) is not torch.nn.Linear:
        raise TypeError(f"fused log-prob kernel needs a plain torch.nn.Linear output head, got {type(head).__module__}."
                        f"{type(head).__name__} (PEFT adapter on lm_head?). Set trainer.fused_logprobs=false to use the "
                        f"unfused path")
    return head.weight, head.bias


def fused_head_weights(head, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) for the fused kernel, or an error naming why it cannot serve this head/config."""
    if config.top_k or config.top_p < 1.0:
        raise ValueError("the fused log-prob kernel supports temperature only, not top-k/top-p: set "
                         "trainer.fused_logprobs=false")
    return plain_linear_head(head)


def head_logprob_fn(allow_fallback: bool = False, compile: bool = True, head_dtype: torch.dtype | None = None):
    """A ``logprob_fn(hidden [B,T,H], head, targets [B,T], config) -> [B,T]`` for
    :func:`fdiv_align.sampling.score`: the fused kernel, with the sampler's temperature. Top-k/top-p
    need whole logit rows: refused unless ``allow_fallback`` (then the unfused path is used).
    ``head_dtype`` (e.g. bf16): the head's GEMMs in that dtype (fp32 logits, see
    :mod:`.low_precision_head`); None = fp32."""
    from ..sampling import transformed_logprobs

    def fn(hidden, head, targets, config):
        try:
            weight, bias = fused_head_weights(head, config)
        except (TypeError, ValueError):
            if not allow_fallback:
                raise
            from ..sampling import head_logits

            logp = transformed_logprobs(head_logits(head, hidden, head_dtype), config)
            return logp.gather(-1, targets[..., None]).squeeze(-1)
        h, w = head_inputs(hidden, weight, head_dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the head's own precision, like head_logits
            return token_logprobs(h, w, targets, temperature=config.temperature,
                                  bias=None if bias is None else bias.float(), compile=compile)

    return fn
