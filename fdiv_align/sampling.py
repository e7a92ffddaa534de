"""Sampling with log q recorded at generation time, and scoring of given continuations.

Layout (one convention for sampling and scoring, so that positions never differ):

* a context c is encoded as [BOS] + tokens(c) (BOS = the tokenizer's bos token, else its eos);
* prompts are **left-padded** to a common length; position ids are cumsum(attention_mask) − 1, so
  the first real token of every row has position 0 whatever the padding;
* the continuation x = (x_1..x_T) follows the prompt; after EOS (when ``stop_at_eos``) the row is
  padded and masked. log π(x|c) = Σ_t log π(x_t | c, x_<t) over generated tokens, EOS included.

Sampling transformation (``SamplingConfig``): logits / temperature, then top-k, then top-p
(nucleus, keeping the smallest set of tokens whose mass reaches top_p). ``transformed_logprobs``
returns the log-probabilities of the distribution actually sampled from; the sampler records
them, and scoring with the same config uses the same function. Pure ancestral sampling
(temperature 1, no top-k/top-p) is the default and is what the f-DPG estimator assumes for q.
"""

from __future__ import annotations

import torch

from .batch import Batch, decode, encode_contexts, make_batch, pad_rows
from .kernels import weighted_token_logprob_sum
from .logprobs import (PLAIN, LogProbBackend, SamplingConfig, fused_head_weights, head_inputs, head_logits,
                       transformed_logprobs)

__all__ = ["SamplingConfig", "Batch", "transformed_logprobs", "encode_contexts", "sample", "score", "weighted_logprob_sum",
           "make_batch", "backbone_and_head", "pad_rows", "last_token_hidden"]


def _model_window(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def sample(model, tokenizer, contexts: list[str], num_samples: int | list[int], max_new_tokens: int,
           config: SamplingConfig = SamplingConfig(), stop_at_eos: bool = True,
           generator: torch.Generator | None = None, context_index: torch.Tensor | None = None,
           uniforms: torch.Tensor | None = None, backend: LogProbBackend = PLAIN) -> Batch:
    """Ancestral samples with KV cache; log q of every token recorded as it is drawn.

    ``num_samples`` per context (int or one count per context), or explicit ``context_index``.
    With ``stop_at_eos`` the length is at most ``max_new_tokens``; otherwise exactly that.
    Tokens are drawn by inverse CDF from uniforms U [B, max_new_tokens] (drawn from ``generator``
    unless given), so a sample depends only on its own row of U: splitting a batch across
    processes or micro-batches gives the same samples. ``backend``: the body's autocast dtype and the
    head's GEMM dtype (:class:`~fdiv_align.logprobs.LogProbBackend`; default fp32).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    window = _model_window(model)
    encoded = encode_contexts(tokenizer, contexts, None if window is None else window - max_new_tokens)
    if context_index is None:
        counts = [num_samples] * len(contexts) if isinstance(num_samples, int) else list(num_samples)
        if len(counts) != len(contexts):
            raise ValueError(f"num_samples: {len(counts)} counts for {len(contexts)} contexts")
        context_index = torch.repeat_interleave(torch.arange(len(contexts)), torch.tensor(counts))
    context_index = torch.as_tensor(context_index, dtype=torch.long)
    if context_index.numel() == 0:
        raise ValueError("sample: no samples requested")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = pad_rows([encoded[i] for i in context_index.tolist()], tokenizer.pad_token_id)
    B = prompt_ids.shape[0]
    if uniforms is None:
        uniforms = torch.rand((B, max_new_tokens), generator=generator, dtype=torch.float64)
    if uniforms.shape != (B, max_new_tokens):
        raise ValueError(f"uniforms: expected shape {(B, max_new_tokens)}, got {tuple(uniforms.shape)}")
    with backend.autocast(device.type):
        out = _decode_loop(model, tokenizer, context_index, prompt_ids.to(device), prompt_mask.to(device),
                           uniforms.to(device), config, stop_at_eos, backend.head_dtype)
    tokens, mask, token_logq = out
    batch = Batch(context_index, list(contexts), prompt_ids, prompt_mask, tokens.cpu(), mask.cpu(), token_logq.cpu())
    batch.texts = decode(tokenizer, batch.tokens, batch.mask)
    return batch


DRAW_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from non-negative, not necessarily normalised weights [B, V]: the first token
    whose cumulative mass exceeds u·total (zero-mass tokens are never drawn). Two levels: fp32 block
    sums and their fp64 cumulative sum pick the block, a cumulative sum inside that block alone
    picks the token — the same draw as one cumulative sum over the row up to the rounding of the
    fp32 block sums (≤ 256·2⁻²⁴ of a block's mass: u moves by less than 2·10⁻⁵ of it), without a
    sequential pass over all V or an fp64 copy of the row."""
    B, V = weights.shape
    pad = (-V) % DRAW_BLOCK
    blocks = (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(B, -1, DRAW_BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [B, V / block]
    target = u.to(torch.float64) * block_cdf[:, -1]
    j = torch.searchsorted(block_cdf, target[:, None], right=True).clamp_max(blocks.shape[1] - 1)  # [B, 1]
    before = torch.where(j > 0, block_cdf.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(target[:, None]))
    inner = blocks.gather(1, j[..., None].expand(B, 1, DRAW_BLOCK)).squeeze(1).double().cumsum(-1)  # [B, block]
    k = torch.searchsorted(inner, target[:, None] - before, right=True)
    last_positive = (inner < inner[:, -1:]).sum(-1, keepdim=True)  # fp64 rounding must not pick a zero-mass tail
    return (j * DRAW_BLOCK + torch.minimum(k, last_positive)).squeeze(1)


def _draw_step(logits: torch.Tensor, u: torch.Tensor, config: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log q [B]) of one decoding step from fp32 logits [B, V] (overwritten). With
    temperature only, q = softmax(z/τ) is never normalised as a whole: the draw takes the weights
    exp(z/τ − max) and log q(token) = z_token/τ − max − log Σ exp(z/τ − max). Top-k/top-p go through
    :func:`transformed_logprobs`."""
    if config.top_k or config.top_p < 1.0:
        logp = transformed_logprobs(logits, config)
        tok = _draw(logp.exp(), u)
        return tok, logp.gather(1, tok[:, None]).squeeze(1)
    z = logits if config.temperature == 1.0 else logits.mul_(1.0 / config.temperature)
    z = z.sub_(z.amax(-1, keepdim=True)).exp_()  # in place: weights exp(z − max), the largest 1
    tok = _draw(z, u)
    return tok, torch.log(z.gather(1, tok[:, None]).squeeze(1)) - torch.log(z.sum(-1))


def _prefill_unique(backbone, context_index, ids, attn, pos):
    """Run the prompt through the model once per distinct context (rows of one context are identical,
    padding included) and give every row its context's KV cache (``Cache.reorder_cache``) and last
    hidden state. Every row its own context: the plain batched prefill."""
    uniq, inverse = torch.unique(context_index.to(ids.device), return_inverse=True)
    if len(uniq) == ids.shape[0]:
        return backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    first = torch.full((len(uniq),), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    out = backbone(input_ids=ids[first], attention_mask=attn[first], position_ids=pos[first], use_cache=True)
    if not hasattr(out.past_key_values, "reorder_cache"):
        raise TypeError(f"{type(backbone).__name__} returned a {type(out.past_key_values).__name__} KV cache; "
                        "sampling needs a transformers Cache (with reorder_cache)")
    out.past_key_values.reorder_cache(inverse)  # index_select over the batch: row i gets its context's keys/values
    out.last_hidden_state = out.last_hidden_state[inverse]
    return out


def _decode_loop(model, tokenizer, context_index, ids, attn, uniforms, config, stop_at_eos, head_dtype):
    """The decoding steps: (tokens, mask, token log q) [B, ≤ T] on the model's device, from left-padded
    prompts ``ids``/``attn`` and uniforms [B, T] (T = max_new_tokens)."""
    (B, max_new_tokens), device = uniforms.shape, ids.device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    token_logq = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    backbone, head = backbone_and_head(model)
    out = _prefill_unique(backbone, context_index, ids, attn, pos)
    last_pos = pos[:, -1:]
    width = max_new_tokens
    buffers = {}  # the head's [B, V] outputs, reused by every step
    for t in range(max_new_tokens):
        tok, tok_logq = _draw_step(head_logits(head, out.last_hidden_state[:, -1, :], head_dtype, buffers),
                                   uniforms[:, t], config)
        live = ~finished
        tokens[:, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
        token_logq[:, t] = torch.where(live, tok_logq, torch.zeros_like(token_logq[:, t]))
        mask[:, t] = live.long()
        if stop_at_eos and eos_id is not None:
            finished = finished | (tok == eos_id)
            if bool(finished.all()):
                width = t + 1  # every row has ended: drop the all-padding columns
                break
        if t + 1 == max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = backbone(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=last_pos,
                       past_key_values=out.past_key_values, use_cache=True)
    return tokens[:, :width], mask[:, :width], token_logq[:, :width]


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
    sequence-classification head reads (fdiv_align/reward_model.py)."""
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
                         pad_id: int = 0, backend: LogProbBackend = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i w_i log π(x_i|c_i) as a differentiable scalar, detached [B] log π), under ``backend``.

    ``backend.fused``: the head's gradients are computed in the forward pass by
    :func:`fdiv_align.kernels.weighted_token_logprob_sum` (the weights are known before the forward,
    as f-DPG's coefficients are), never materialising [tokens × vocab] logits. Needs a plain
    ``nn.Linear`` head and no top-k/top-p (refused otherwise); unfused is the plain path of :func:`score`.
    """
    device = next(model.parameters()).device
    m = batch.mask.to(device).bool()
    w = sequence_weights.to(device, torch.float32)
    if not backend.fused:
        _, seq = score(model, batch, config, pad_id=pad_id, backend=backend)
        return (w * seq).sum(), seq.detach()
    with backend.autocast(device.type):
        h, head = _continuation_hidden(model, batch, "left", pad_id)
        weight, bias = fused_head_weights(head, config)
        h, weight = head_inputs(h, weight, backend.head_dtype)
        token_w = torch.where(m, w[:, None].expand_as(m), torch.zeros((), device=device))
        with torch.autocast(device.type, enabled=False):  # the head's own precision, like head_logits
            total, tok_lp = weighted_token_logprob_sum(h, weight, batch.tokens.to(device), token_w, config.temperature,
                                                       bias=None if bias is None else bias.float(), compile=backend.compile)
    return total, torch.where(m, tok_lp, torch.zeros_like(tok_lp)).sum(-1)


def score(model, batch: Batch, config: SamplingConfig = SamplingConfig(), padding_side: str = "left",
          pad_id: int = 0, backend: LogProbBackend = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_t | c, x_<t) for the continuation tokens: ([B, T] per token, 0 at padding; [B] sums).

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for evaluation). Only the hidden
    states that predict continuation tokens go through the head. ``backend``
    (:class:`~fdiv_align.logprobs.LogProbBackend`): the body's autocast, the head's GEMM dtype, and
    the fused kernel in place of the head + log-softmax + gather step when ``backend.fused``.
    """
    device = next(model.parameters()).device
    logprob_fn = backend.logprob_fn()
    with backend.autocast(device.type):
        h, head = _continuation_hidden(model, batch, padding_side, pad_id)  # [B, T, H]
        targets = batch.tokens.to(device)
        if logprob_fn is None:
            logp = transformed_logprobs(head_logits(head, h, backend.head_dtype), config)
            tok_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
        else:
            tok_lp = logprob_fn(h.float(), head, targets, config)
    m = batch.mask.to(device).bool()
    tok_lp = torch.where(m, tok_lp, torch.zeros_like(tok_lp))
    return tok_lp, tok_lp.sum(-1)
