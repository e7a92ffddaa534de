"""Scoring given continuations: log π(x|c) of each token and of each sequence, the surrogate
Σ w·log π with the fused kernel, and the decoder's hidden states in the library's one layout
(fdiv_align/lm/sampling.py describes it; sampling and scoring share it so positions never differ).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .batch import Batch, pad_rows
from .logprobs import SamplingConfig, fused_token_logprobs, fused_weighted_logprob_sum, head_logits, transformed_logprobs
from .precision import PLAIN, ComputePlan

__all__ = ["Scores", "score", "weighted_logprob_sum", "WeightedLogprobSum", "backbone_and_head", "last_token_hidden"]


class Scores(NamedTuple):
    token_logprobs: torch.Tensor  # [B, T] log π(x_t | c, x_<t), 0 at padding
    sequence_logprobs: torch.Tensor  # [B] their sums


class WeightedLogprobSum(NamedTuple):
    total: torch.Tensor  # Σ_i w_i log π(x_i|c_i), differentiable scalar
    sequence_logprobs: torch.Tensor  # [B] log π(x_i|c_i), detached


def backbone_and_head(model):
    """(decoder returning hidden states, lm_head) of a HF causal LM, PEFT-wrapped or not."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    backbone = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", None)
    head = inner.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(f"{type(inner).__name__}: cannot find the decoder and the output head")
    return backbone, head


def _layout(batch: Batch, padding_side: str, pad_id: int):
    """input ids, attention mask, position ids and, per continuation token, the index of the hidden
    state that predicts it ([B, T])."""
    B, T = batch.tokens.shape
    if padding_side == "left":
        ids = torch.cat([batch.prompt_ids, batch.tokens], dim=1)
        attn = torch.cat([batch.prompt_mask, batch.mask], dim=1)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        Lp = batch.prompt_ids.shape[1]
        predict = (Lp - 1 + torch.arange(T)).expand(B, T)
        return ids, attn, pos, predict
    if padding_side == "right":
        plen = batch.prompt_mask.sum(-1)
        rows = [torch.cat([batch.prompt_ids[i][batch.prompt_mask[i].bool()], batch.tokens[i][batch.mask[i].bool()]])
                for i in range(B)]
        ids, attn = pad_rows(rows, pad_id, "right")
        width = ids.shape[1]
        pos = torch.arange(width).expand(B, width)
        predict = (plen[:, None] - 1 + torch.arange(T)).clamp_max(width - 1)
        return ids, attn, pos, predict
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def _continuation_hidden(model, batch: Batch, padding_side: str, pad_id: int):
    """Hidden states [B, T, H] that predict the continuation tokens, and the output head."""
    device = next(model.parameters()).device
    ids, attn, pos, predict = _layout(batch, padding_side, pad_id)
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device)).last_hidden_state
    return hidden.gather(1, predict.to(device)[..., None].expand(-1, -1, hidden.shape[-1])), head


def last_token_hidden(model, batch: Batch, pad_id: int = 0) -> torch.Tensor:
    """[B, H] the decoder's final hidden state at each row's last continuation token, in the layout of
    :func:`score` (prompt left-padded, position ids from the attention mask): what a
    sequence-classification head reads (fdiv_align/targets/reward_model.py)."""
    device = next(model.parameters()).device
    ids, attn, pos, _ = _layout(batch, "left", pad_id)
    backbone, _ = backbone_and_head(model)
    hidden = backbone(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device)).last_hidden_state
    lengths = batch.mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"rows {(lengths == 0).nonzero().squeeze(1).tolist()} have an empty continuation: no last token")
    last = batch.prompt_ids.shape[1] + lengths - 1
    return hidden[torch.arange(len(batch), device=device), last.to(device)]


def weighted_logprob_sum(model, batch: Batch, sequence_weights: torch.Tensor, config: SamplingConfig = SamplingConfig(),
                         pad_id: int = 0, plan: ComputePlan = PLAIN) -> WeightedLogprobSum:
    """(Σ_i w_i log π(x_i|c_i) as a differentiable scalar, detached [B] log π), under ``plan``.

    ``plan.fused``: the head's gradients are computed in the forward pass by the plan's fused kernel
    (:func:`fdiv_align.lm.logprobs.fused_weighted_logprob_sum`; the weights are known before the forward,
    as f-DPG's coefficients are), never materialising [tokens × vocab] logits. Needs a plain
    ``nn.Linear`` head and no top-k/top-p (refused otherwise); unfused is the plain path of :func:`score`.
    """
    device = next(model.parameters()).device
    m = batch.mask.to(device).bool()
    w = sequence_weights.to(device, torch.float32)
    if not plan.fused:
        seq = score(model, batch, config, pad_id=pad_id, plan=plan).sequence_logprobs
        return WeightedLogprobSum((w * seq).sum(), seq.detach())
    with plan.autocast(device.type):
        h, head = _continuation_hidden(model, batch, "left", pad_id)
        token_w = torch.where(m, w[:, None].expand_as(m), torch.zeros((), device=device))
        total, tok_lp = fused_weighted_logprob_sum(h, head, batch.tokens.to(device), token_w, config, plan.head_dtype,
                                                   plan.compile, plan.kernel)
    return WeightedLogprobSum(total, torch.where(m, tok_lp, torch.zeros_like(tok_lp)).sum(-1))


def score(model, batch: Batch, config: SamplingConfig = SamplingConfig(), padding_side: str = "left",
          pad_id: int = 0, plan: ComputePlan = PLAIN) -> Scores:
    """log π(x_t | c, x_<t) for the continuation tokens: ([B, T] per token, 0 at padding; [B] sums).

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for evaluation). Only the hidden
    states that predict continuation tokens go through the head. ``plan``
    (:class:`~fdiv_align.lm.precision.ComputePlan`): the body's autocast, the head's GEMM dtype, and
    the fused kernel in place of the head + log-softmax + gather step when ``plan.fused``.
    """
    device = next(model.parameters()).device
    with plan.autocast(device.type):
        h, head = _continuation_hidden(model, batch, padding_side, pad_id)  # [B, T, H]
        targets = batch.tokens.to(device)
        if plan.fused:
            tok_lp = fused_token_logprobs(h.float(), head, targets, config, plan.head_dtype, plan.compile, plan.kernel)
        else:
            logp = transformed_logprobs(head_logits(head, h, plan.head_dtype), config)
            tok_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    m = batch.mask.to(device).bool()
    tok_lp = torch.where(m, tok_lp, torch.zeros_like(tok_lp))
    return Scores(tok_lp, tok_lp.sum(-1))
