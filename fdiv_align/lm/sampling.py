"""Sampling with log q recorded at generation time (scoring given continuations: fdiv_align/lm/scoring.py).

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

import inspect

import torch

from .batch import Batch, decode, encode_contexts, make_batch, pad_rows
from .logprobs import SamplingConfig, head_logits, transformed_logprobs
from .precision import PLAIN, ComputePlan
from .scoring import backbone_and_head

__all__ = ["SamplingConfig", "Batch", "transformed_logprobs", "encode_contexts", "sample", "make_batch", "pad_rows",
           "model_window"]


def model_window(model) -> int | None:
    """The model's positions (``max_position_embeddings``), None when its config names none."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def sample(model, tokenizer, contexts: list[str], num_samples: int | list[int], max_new_tokens: int,
           config: SamplingConfig = SamplingConfig(), stop_at_eos: bool = True,
           generator: torch.Generator | None = None, context_index: torch.Tensor | None = None,
           uniforms: torch.Tensor | None = None, plan: ComputePlan = PLAIN) -> Batch:
    """Ancestral samples with KV cache; log q of every token recorded as it is drawn.

    ``num_samples`` per context (int or one count per context), or explicit ``context_index``.
    With ``stop_at_eos`` the length is at most ``max_new_tokens``; otherwise exactly that.
    Tokens are drawn by inverse CDF from uniforms U [B, max_new_tokens] (drawn from ``generator``
    unless given), so a sample depends only on its own row of U: splitting a batch across
    processes or micro-batches gives the same samples. ``plan``: the body's autocast dtype, the
    head's GEMM dtype and the decoding's KV cache (:class:`~fdiv_align.lm.precision.ComputePlan`; default fp32,
    dynamic cache; see :func:`_decode_loop`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    window = model_window(model)
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
    with plan.autocast(device.type):
        out = _decode_loop(model, tokenizer, context_index, prompt_ids.to(device), prompt_mask.to(device),
                           uniforms.to(device), config, stop_at_eos, plan.head_dtype, plan.decode)
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


def kv_cache_argument(backbone) -> str:
    """The decoder's keyword for a KV cache: ``cache`` in current transformers (``past_key_values`` is
    deprecated there), ``past_key_values`` in releases before the rename."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def kv_cache(out):
    """The KV cache of a decoder's output (``cache``, or ``past_key_values`` before the rename)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _prefill_unique(backbone, context_index, ids, attn, pos, cache: dict):
    """Run the prompt through the model once per distinct context (rows of one context are identical,
    padding included) and give every row its context's KV cache (``Cache.reorder_cache``) and last
    hidden state. Every row its own context: the plain batched prefill. ``cache``: the keyword giving the
    decoder a cache to fill (a static one), or nothing (it makes a dynamic one)."""
    uniq, inverse = torch.unique(context_index.to(ids.device), return_inverse=True)
    if len(uniq) == ids.shape[0]:
        return backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **cache)
    first = torch.full((len(uniq),), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    out = backbone(input_ids=ids[first], attention_mask=attn[first], position_ids=pos[first], use_cache=True, **cache)
    cache = kv_cache(out)
    if not hasattr(cache, "reorder_cache"):
        raise TypeError(f"{type(backbone).__name__} returned a {type(cache).__name__} KV cache; "
                        "sampling needs a transformers Cache (with reorder_cache)")
    cache.reorder_cache(inverse)  # index_select over the batch: row i gets its context's keys/values
    out.last_hidden_state = out.last_hidden_state[inverse]
    return out


def _decode_loop(model, tokenizer, context_index, ids, attn, uniforms, config, stop_at_eos, head_dtype, decode="dynamic"):
    """The decoding steps: (tokens, mask, token log q) [B, ≤ T] on the model's device, from left-padded
    prompts ``ids``/``attn`` and uniforms [B, T] (T = max_new_tokens).

    ``decode`` (:attr:`fdiv_align.lm.precision.ComputePlan.decode`): ``dynamic`` — a KV cache that grows by one
    column a step (transformers' DynamicCache) and an attention mask grown alike; ``static`` — a preallocated
    cache of prompt + T positions rounded up to :data:`STATIC_BUCKET` (``StaticCache``) and one attention mask for
    the whole loop (the columns after the prompt set from the start: causality hides those not yet written), so
    every step has the same shapes and addresses; ``captured`` — static, with the step (decoder, head, draw) compiled by
    ``torch.compile(mode="reduce-overhead")``, which replays it as a CUDA graph: one launch per step instead of
    one per kernel. Every mode draws the same tokens from the same uniforms (tests/test_sampling.py)."""
    (B, max_new_tokens), device = uniforms.shape, ids.device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    token_logq = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    backbone, head = backbone_and_head(model)
    cache_kwarg = kv_cache_argument(backbone)
    static = decode in ("static", "captured")
    if static:
        length = -(-(ids.shape[1] + max_new_tokens) // STATIC_BUCKET) * STATIC_BUCKET  # few shapes: few recompilations
        out = _prefill_unique(backbone, context_index, ids, attn, pos, {cache_kwarg: _static_cache(model, length)})
        _keep_static_addresses(kv_cache(out))
        attn = torch.cat([attn, torch.ones((B, length - ids.shape[1]), dtype=attn.dtype, device=device)], dim=1)
    else:
        out = _prefill_unique(backbone, context_index, ids, attn, pos, {})
    cache = {cache_kwarg: kv_cache(out)}  # updated in place by every step
    step = _compiled_step if decode == "captured" else _decode_step
    last_pos = pos[:, -1:]
    hidden = out.last_hidden_state[:, -1, :]
    width = max_new_tokens
    buffers = {}  # the head's [B, V] outputs, reused by every step
    for t in range(max_new_tokens):
        tok, tok_logq = _draw_step(head_logits(head, hidden, head_dtype, buffers), uniforms[:, t], config)
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
        last_pos = last_pos + 1
        if not static:
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        hidden = step(backbone, tokens[:, t:t + 1], attn, last_pos, cache)
    return tokens[:, :width], mask[:, :width], token_logq[:, :width]


#: a static cache's length is prompt + new tokens rounded up to a multiple of this
STATIC_BUCKET = 64


def _static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _keep_static_addresses(cache) -> None:
    """Mark a static cache's tensors as fixed addresses (the prefill's reorder replaced them), so that a captured
    step updates them in place instead of copying them in and out of the graph."""
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                torch._dynamo.mark_static_address(getattr(layer, name))


def _decode_step(backbone, token, attn, position, cache: dict) -> torch.Tensor:
    """One decoding step: the last hidden state [B, H] of ``token`` [B, 1], ``cache`` updated in place."""
    out = backbone(input_ids=token, attention_mask=attn, position_ids=position, use_cache=True, **cache)
    return out.last_hidden_state[:, -1, :]


#: the captured step: torch.compile's CUDA-graph mode over the decoder step (compiled once per shape)
_compiled_step = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)
