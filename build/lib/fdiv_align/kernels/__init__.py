"""Fused lm_head → token log-prob kernels (see :mod:`.token_logprobs`). They import nothing else of the
package; :mod:`fdiv_align.lm.logprobs` plugs them into scoring."""

from __future__ import annotations

from .low_precision_head import low_precision_weight, shifted_head_logits
from .token_logprobs import (
    default_chunk_size,
    default_vocab_tile,
    reference_token_logprobs,
    token_logprobs,
    weighted_token_logprob_sum,
)

__all__ = ["token_logprobs", "reference_token_logprobs", "weighted_token_logprob_sum", "default_chunk_size",
           "default_vocab_tile", "low_precision_weight", "shifted_head_logits"]
