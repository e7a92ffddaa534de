"""Eager attention for grouped-query models without materialising repeated keys and values.

transformers' eager attention expands the K/V heads to the query heads with ``repeat_kv`` — a copy
of the whole KV cache in every layer at every decoding step (SmolLM2: 3 KV heads for 9 query heads,
60 such copies per step, each a fresh allocation). Here the g = H_q / H_kv query heads that share a
KV head are stacked along the query axis instead:

    q [B, H_q, T, D] → [B, H_kv, g·T, D],   softmax(q Kᵀ·s + mask) V  per KV head,   → [B, H_q, T, D]

which is the same attention (each output is the same dot products and the same softmax), with one
batched GEMM per KV head and no copy of K or V. Registered with transformers' attention and
mask interfaces as ``fdiv_grouped_eager`` (masks: the eager additive mask); the trainer's default on
CPU (``model.attn_implementation``).
"""

from __future__ import annotations

import torch

__all__ = ["GROUPED_EAGER", "grouped_eager_attention", "register_grouped_eager"]

GROUPED_EAGER = "fdiv_grouped_eager"


def grouped_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention-interface signature: query [B, H_q, T, D], key/value [B, H_kv, S, D],
    additive (or boolean) mask [B, 1, T, ≥S]; returns (output [B, T, H_q, D], weights [B, H_q, T, S])."""
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = Hq // Hkv
    q = query.reshape(B, Hkv, g * T, D)  # a view when T = 1 (decoding)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling  # [B, H_kv, g·T, S]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :S]
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=w.dtype, device=w.device).masked_fill(~mask, torch.finfo(w.dtype).min)
        w = (w.view(B, Hkv, g, T, S) + mask[:, :, None]).view(B, Hkv, g * T, S)
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value)  # [B, H_kv, g·T, D]
    return out.view(B, Hq, T, D).transpose(1, 2).contiguous(), w.view(B, Hq, T, S)


def register_grouped_eager() -> str:
    """Register the attention and its mask kind with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)
    return GROUPED_EAGER
