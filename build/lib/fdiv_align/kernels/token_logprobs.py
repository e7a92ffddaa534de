"""Fused linear → token log-prob (and entropy) without materialising [tokens × vocab] logits.

For hidden states h [N, H], head weight W [V, H] (bias b [V] optional), targets y [N] and a
temperature τ (the sampler's: z = (h Wᵀ + b)/τ):

    lp_i  = z_{i,y_i} − logsumexp_j z_{i,j}                 (token log-prob)
    ent_i = logsumexp_j z_{i,j} − Σ_j p_{i,j} z_{i,j}         (entropy of softmax(z_i), nats)

Forward processes the tokens in chunks of ``chunk_size`` rows (default: 2^24 / V) over whole
vocabulary rows, writing each chunk's logits into one reused fp32 buffer; it saves only the inputs
and the per-token log-sum-exp (and mean logit, for the entropy), plus — within a fixed budget
(``saved_logits_budget``, default 2^26 elements) — the logits of the last tokens, which backward
then uses without recomputing. For the other tokens backward walks the vocabulary in tiles of
``vocab_tile`` columns over all of them (default: 2^24 / N, at least 256), recomputes each tile's
logits and overwrites them in place with

    ∂/∂z_{ij} = g_i (1[j = y_i] − p_{ij}) − e_i p_{ij} (z_{ij} − Σ_k p_{ik} z_{ik})

(g, e = upstream grads of lp and ent), then grad_h += ∂z W_tile / τ (fp32 accumulator [N, H]),
grad_W[tile] = ∂zᵀ h / τ and grad_b[tile] = Σ ∂z / τ — each row of grad_W written once, where
token chunks would read and rewrite all of grad_W [V, H] once per chunk. For recomputed tokens that
is 4 matmuls (the logits twice), against 3 for the materialising version: the price of not storing
[N, V]; the kept tokens cost 3.
Matmuls take the input dtype (fp32 or bf16) with fp32 accumulation of the softmax math; bf16/fp16
logits are shifted by each row's target logit inside the GEMM (:mod:`.low_precision_head`), so
their output rounding is relative to the distance from it rather than to |z|; gradients
of W and b are accumulated in fp32 and cast back at the end. The chunk math (max, exp, sums,
gathers, the softmax gradient) is compiled with ``torch.compile`` (dynamic shapes, so a short last
chunk or a new N does not recompile) while the matmuls go straight to BLAS; ``compile=False`` gives
the eager fallback, and :func:`reference_token_logprobs` the plain (materialising) reference.

:func:`weighted_token_logprob_sum` is the loss form used by the trainer: L = Σ_i w_i lp_i with w
known before the forward (f-DPG's coefficients are), computing the gradients during the forward
— 3 matmuls in all, like the naive version, instead of 4 — and scaling them by the upstream
scalar in backward.
"""

from __future__ import annotations

import functools

import torch

from .low_precision_head import shifted_matmul, target_shift

__all__ = ["token_logprobs", "reference_token_logprobs", "weighted_token_logprob_sum", "default_chunk_size",
           "default_vocab_tile"]


#: fp32 elements of one block of logits (64 MiB): forward token chunks and backward vocabulary tiles
BLOCK_BUDGET_ELEMENTS = 1 << 24
MAX_CHUNK_ROWS = 8192  # tokens per forward chunk at most, however small the vocabulary


def default_chunk_size(vocab_size: int, budget_elements: int = BLOCK_BUDGET_ELEMENTS) -> int:
    """Rows per chunk so that one fp32 [chunk, V] buffer holds about 2^24 elements (64 MiB)."""
    return max(1, min(MAX_CHUNK_ROWS, budget_elements // max(1, vocab_size)))


# Chunk math on the logits z (fp32, already divided by τ). Matmuls stay outside (BLAS, writing into
# one reused buffer); these elementwise/reduction passes are what torch.compile fuses. The gradient
# functions overwrite z with ∂L/∂z in place, so no second [rows, V] block is allocated.

def _chunk_stats(z, y, want_entropy: bool):
    """(lp, lse, mean logit Σ_j p_j z_j) of one token chunk (full vocabulary rows)."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    lse = (m + torch.log(s)).squeeze(1)
    lp = z.gather(1, y[:, None]).squeeze(1) - lse
    mean_z = (e * z).sum(-1) / s.squeeze(1) if want_entropy else lse.new_zeros(0)
    return lp, lse, mean_z


def _tile_dz_(z, y_local, lse, g, e_grad, mean_z, want_entropy: bool):
    """Overwrite a vocabulary tile z [N, v] (columns j0 … j0+v−1; ``y_local`` = y − j0) with
    ∂L/∂z = g (1[j = y] − p) − e_grad · p (z − Σ_k p_k z_k), p = exp(z − lse)."""
    p = torch.exp(z - lse[:, None])
    onehot = (torch.arange(z.shape[1], device=z.device)[None, :] == y_local[:, None]).to(z.dtype)
    dz = g[:, None] * (onehot - p)
    if want_entropy:
        dz = dz - e_grad[:, None] * p * (z - mean_z[:, None])
    z.copy_(dz)


def _chunk_lp_and_dz_(z, y, g):
    """lp of a token chunk, overwriting z with ∂(Σ g·lp)/∂z (the forward-gradient form)."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    lp = z.gather(1, y[:, None]).squeeze(1) - m.squeeze(1) - torch.log(s).squeeze(1)
    onehot = (torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]).to(z.dtype)
    z.copy_(g[:, None] * (onehot - e / s))
    return lp


@functools.cache
def _compiled(fn):
    """``fn`` wrapped by torch.compile once per process, with dynamic shapes (a new number of rows or a
    short last chunk reuses the compiled code; tests/test_trainer.py::test_no_recompilation_storm)."""
    return torch.compile(fn, dynamic=True)


def _get(fn, compile: bool):
    return _compiled(fn) if compile else fn


def _row_shift(h, w_in, targets):
    """The per-row shift of low-precision (bf16/fp16) GEMMs (see :mod:`.low_precision_head`): each
    row's target logit, so that output rounding is relative to the distance from it; None for fp32/fp64."""
    return target_shift(h, w_in, targets) if h.dtype in (torch.bfloat16, torch.float16) else None


def _logits(h, w_in, b, inv_temp, buf=None, shift=None):
    """fp32 (h Wᵀ + b)/τ for one block; written into ``buf`` (a reused fp32 buffer) when the inputs
    are fp32, otherwise a new tensor (low-precision inputs: shifted by ``shift`` inside the GEMM);
    bias and temperature applied in place."""
    if buf is not None and h.dtype == torch.float32:
        z = buf[:h.shape[0], :w_in.shape[0]]
        torch.matmul(h, w_in.t(), out=z)
    elif shift is not None:
        z = shifted_matmul(h, w_in, shift)
    else:
        z = torch.matmul(h, w_in.t())
        z = z.float() if z.dtype != torch.float32 else z
    if b is not None:
        z.add_(b.float())
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _buffer(hidden, rows: int, cols: int):
    """The reused fp32 logits block (fp32 inputs only: bf16 matmuls write bf16 results)."""
    if hidden.dtype != torch.float32:
        return None
    return torch.empty(rows, cols, dtype=torch.float32, device=hidden.device)


def _grad_buffers(hidden, weight, need_h: bool, need_w: bool, need_b: bool):
    """fp32 zero accumulators for grad_h, grad_w and grad_b (None where not needed); callers cast
    them back to the input dtypes at the end."""
    def zeros(shape, device, need):
        return torch.zeros(shape, dtype=torch.float32, device=device) if need else None

    return (zeros(hidden.shape, hidden.device, need_h), zeros(weight.shape, weight.device, need_w),
            zeros(weight.shape[0], weight.device, need_b))


def _view(t, index):
    return None if t is None else t[index]


def _accumulate(dz, h, w, grad_h, grad_w, grad_b, inv_temp):
    """One block's gradients from ∂z [rows, cols] (z = h wᵀ/τ): grad_h += ∂z w/τ, grad_w += ∂zᵀ h/τ,
    grad_b += Σ ∂z/τ. The grad_* are the fp32 accumulator views for exactly these rows (h) and
    columns (w): a token chunk passes grad_h[rows] and all of grad_w, a vocabulary tile all of its
    block's grad_h and grad_w[tile]."""
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    if grad_b is not None:
        grad_b += dz.sum(0)
    dz_in = dz.to(h.dtype)
    fp32 = h.dtype == torch.float32
    if grad_h is not None:
        if fp32:
            grad_h.addmm_(dz_in, w)
        else:
            grad_h += torch.matmul(dz_in, w).float()
    if grad_w is not None:
        if fp32:
            grad_w.addmm_(dz_in.t(), h)
        else:
            grad_w += torch.matmul(dz_in.t(), h).float()


DEFAULT_SAVED_LOGITS_BUDGET = 1 << 26  # fp32 elements of forward logits kept for backward (256 MiB)
BACKWARD_ROW_BLOCK = 1 << 16  # tokens per backward block: the [block, tile] buffer stays ~2^24 elements
MIN_VOCAB_TILE = 256  # columns per backward tile at least, however many tokens (GEMMs stay efficient)


def default_vocab_tile(n_tokens: int, vocab_size: int, budget_elements: int = BLOCK_BUDGET_ELEMENTS) -> int:
    """Columns per backward tile so that one fp32 [N, tile] block holds about 2^24 elements."""
    return max(1, min(vocab_size, max(MIN_VOCAB_TILE, budget_elements // max(1, n_tokens))))


class _TokenLogprobs(torch.autograd.Function):
    """Forward: token chunks over full vocabulary rows (the log-sum-exp needs whole rows). The
    logits of the last ``keep`` tokens (keep·V ≤ saved_logits_budget) are kept for backward; the
    others are recomputed there, in vocabulary tiles over all their tokens, so grad_W is written
    once per row (no [V, H] read-modify-write per chunk) and the only accumulator is grad_h [N, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, vocab_tile, want_entropy, compile,
                saved_logits_budget):
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        stats = _get(_chunk_stats, compile)
        w_in = weight.to(hidden.dtype)
        shift = _row_shift(hidden, w_in, targets)
        keep = min(n, saved_logits_budget // vocab) if any(ctx.needs_input_grad[:3]) else 0
        split = n - keep  # tokens [0, split) are recomputed in backward, [split, n) kept
        lps, lses, means, kept = [], [], [], []

        def chunk(s, e, buf):
            z = _logits(hidden[s:e], w_in, bias, inv_temp, buf, _view(shift, slice(s, e)))
            lp, lse, mean_z = stats(z, targets[s:e], want_entropy)
            lps.append(lp)
            lses.append(lse)
            means.append(mean_z)
            return z

        buf = _buffer(hidden, min(chunk_size, split), vocab) if split else None
        for s in range(0, split, chunk_size):
            chunk(s, min(s + chunk_size, split), buf)
        del buf  # not needed while the kept chunks are made
        for s in range(split, n, chunk_size):
            kept.append((s, chunk(s, min(s + chunk_size, n), None)))
        lp, lse = torch.cat(lps), torch.cat(lses)
        mean_z = torch.cat(means) if want_entropy else lse.new_zeros(0)
        ent = lse - mean_z if want_entropy else lse.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse, mean_z)
        ctx.kept, ctx.split, ctx.shift = kept, split, shift  # intermediates (neither inputs nor outputs): held on ctx
        ctx.has_bias, ctx.inv_temp, ctx.vocab_tile = bias is not None, inv_temp, vocab_tile
        ctx.want_entropy, ctx.compile = want_entropy, compile
        ctx.mark_non_differentiable(lse)
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        hidden, weight, bias, targets, lse, mean_z = ctx.saved_tensors
        if ctx.kept is None:
            raise RuntimeError("token_logprobs: backward ran twice through one forward, but its kept logits are "
                               "consumed by the first; pass saved_logits_budget=0 to backpropagate more than once")
        bias = bias if ctx.has_bias else None
        n, vocab = hidden.shape[0], weight.shape[0]
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.float()
        want_e = ctx.want_entropy and g_ent is not None and g_ent.numel() > 0
        g_ent = g_ent.float() if want_e else g_lp.new_zeros(0)
        dfn = _get(_tile_dz_, ctx.compile)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, need_h, need_w, need_b)
        w_in = weight.to(hidden.dtype)

        kept = ctx.kept
        ctx.kept = None if kept else []  # consumed below; nothing kept → backward may run again
        while kept:  # kept chunks: ∂z in place of the kept logits, freed one by one
            s, z = kept.pop(0)
            sl = slice(s, s + z.shape[0])
            dfn(z, targets[sl], lse[sl], g_lp[sl], g_ent[sl], mean_z[sl], want_e)  # (empty tensors slice to empty)
            _accumulate(z, hidden[sl], w_in, _view(grad_h, sl), grad_w, grad_b, ctx.inv_temp)
            del z
        split = ctx.split
        # low precision: recompute with the forward's shift, so that the recomputed logits round as the
        # forward's did and p = exp(z − lse) stays normalised
        shift = ctx.shift
        rows = max(1, min(split, BACKWARD_ROW_BLOCK))
        tile = ctx.vocab_tile or default_vocab_tile(rows, vocab)
        buf = _buffer(hidden, rows, min(tile, vocab)) if split else None
        for r in range(0, split, rows):  # recomputed tokens: one block unless more than BACKWARD_ROW_BLOCK
            rs = slice(r, min(r + rows, split))
            for j in range(0, vocab, tile):
                cols = slice(j, j + tile)
                z = _logits(hidden[rs], w_in[cols], _view(bias, cols), ctx.inv_temp, buf, _view(shift, rs))
                dfn(z, targets[rs] - j, lse[rs], g_lp[rs], g_ent[rs], mean_z[rs], want_e)
                _accumulate(z, hidden[rs], w_in[cols], _view(grad_h, rs), _view(grad_w, cols), _view(grad_b, cols),
                            ctx.inv_temp)
        return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None)


def _check(hidden, weight, targets, bias, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"token_logprobs: targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"token_logprobs: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int | None = None, return_entropy: bool = False, bias: torch.Tensor | None = None,
                   compile: bool = True, vocab_tile: int | None = None,
                   saved_logits_budget: int = DEFAULT_SAVED_LOGITS_BUDGET):
    """log softmax((h Wᵀ + b)/τ)[y] per token, fp32 [N] (and the entropy [N] if asked). Leading dims
    of ``hidden``/``targets`` are flattened and restored.

    Memory is bounded by constants, never by N·V: one [chunk, V] block of logits at a time, plus —
    when a gradient is needed — the fp32 logits of the last ⌊saved_logits_budget / V⌋ tokens kept
    from forward so that backward need not recompute them (default 2^26 elements = 256 MiB; 0 =
    recompute everything, and only then may backward run more than once through one forward).
    """
    lead = hidden.shape[:-1]
    h2, y2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    _check(h2, weight, y2, bias, temperature)
    if h2.shape[0] == 0:
        empty = h2.new_zeros(lead, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if vocab_tile is not None and vocab_tile < 1:
        raise ValueError(f"token_logprobs: vocab_tile must be a positive number of columns, got {vocab_tile}")
    if chunk < 1:
        raise ValueError(f"token_logprobs: chunk_size must be a positive number of tokens, got {chunk}")
    if saved_logits_budget < 0:
        raise ValueError(f"token_logprobs: saved_logits_budget must be ≥ 0 elements, got {saved_logits_budget}")
    lp, ent, _ = _TokenLogprobs.apply(h2, weight, bias, y2, float(temperature), int(chunk),
                                      None if vocab_tile is None else int(vocab_tile), bool(return_entropy), bool(compile),
                                      int(saved_logits_budget))
    lp = lp.reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp


def reference_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None):
    """The plain computation (materialises all logits): the test and benchmark reference."""
    z = torch.matmul(hidden, weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    logp = torch.log_softmax(z / temperature, dim=-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    if return_entropy:
        return lp, -(logp.exp() * logp).sum(-1)
    return lp


class _WeightedSum(torch.autograd.Function):
    """L = Σ w_i lp_i with gradients computed in the forward pass (w known up front)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, temperature, chunk_size, compile):
        n = hidden.shape[0]
        inv_temp = 1.0 / temperature
        fused = _get(_chunk_lp_and_dz_, compile)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, need_h, need_w, need_b)
        wts = token_weights.float()
        w_in = weight.to(hidden.dtype)
        shift = _row_shift(hidden, w_in, targets)
        buf = _buffer(hidden, min(chunk_size, n), weight.shape[0])
        lps = []
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            z = _logits(hidden[sl], w_in, bias, inv_temp, buf, _view(shift, sl))
            lps.append(fused(z, targets[sl], wts[sl]))  # z now holds ∂z
            _accumulate(z, hidden[sl], w_in, _view(grad_h, sl), grad_w, grad_b, inv_temp)
        del buf
        lp_all = torch.cat(lps)
        total = (wts * lp_all).sum()
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w, need_b, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.consumed = False
        ctx.mark_non_differentiable(lp_all)
        return total, lp_all

    @staticmethod
    def backward(ctx, g_total, _g_lp):
        if ctx.consumed:
            raise RuntimeError("weighted_token_logprob_sum: backward ran twice through one forward, but its gradients "
                               "(computed in the forward pass) were handed out and scaled in place by the first; call "
                               "weighted_token_logprob_sum again for another backward")
        ctx.consumed = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b, hdtype, wdtype, bdtype = ctx.flags
        s = g_total.float()
        # scale the stored fp32 gradients in place (no second [V, H] buffer); they are not used again
        if need_h:
            grad_h = grad_h.mul_(s).to(hdtype)
        if need_w:
            grad_w = grad_w.mul_(s).to(wdtype)
        if need_b:
            grad_b = grad_b.mul_(s).to(bdtype)
        return (grad_h if need_h else None, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None)


def weighted_token_logprob_sum(hidden, weight, targets, token_weights, temperature: float = 1.0,
                               chunk_size: int | None = None, bias=None, compile: bool = True):
    """(Σ_i w_i lp_i as a differentiable scalar, detached lp [N]); gradients computed in the forward.

    Correct for any upstream gradient of the scalar (backward scales the stored gradients).
    """
    lead = hidden.shape[:-1]
    h2, y2, w2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), token_weights.reshape(-1)
    _check(h2, weight, y2, bias, temperature)
    if w2.shape != y2.shape:
        raise ValueError(f"token_weights must match targets {tuple(targets.shape)}, got {tuple(token_weights.shape)}")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    total, lp = _WeightedSum.apply(h2, weight, bias, y2, w2.detach(), float(temperature), int(chunk), bool(compile))
    return total, lp.reshape(lead)
