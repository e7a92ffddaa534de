"""Fused linear → token log-prob (and entropy) without materialising [tokens × vocab] logits.

For hidden states h [N, H], head weight W [V, H] (bias b [V] optional), targets y [N] and a
temperature τ (the sampler's: z = (h Wᵀ + b)/τ):

    lp_i  = z_{i,y_i} − logsumexp_j z_{i,j}                 (token log-prob)
    ent_i = logsumexp_j z_{i,j} − Σ_j p_{i,j} z_{i,j}         (entropy of softmax(z_i), nats)

Forward processes the tokens in chunks of ``chunk_size`` rows (default: 2^24 / V): one or two
[chunk, V] fp32 buffers at a time; it saves only the inputs and the per-token log-sum-exp. Backward recomputes each
chunk's logits and accumulates

    ∂/∂z_{ij} = g_i (1[j = y_i] − p_{ij}) − e_i p_{ij} (z_{ij} − Σ_k p_{ik} z_{ik})

(g, e = upstream grads of lp and ent), then grad_h = ∂z W / τ, grad_W += ∂zᵀ h / τ, grad_b += Σ ∂z / τ.
Matmuls take the input dtype (fp32 or bf16) with fp32 accumulation of the softmax math; gradients
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


import torch

__all__ = ["token_logprobs", "reference_token_logprobs", "weighted_token_logprob_sum", "default_chunk_size",
           "compile_count"]

_COMPILED = {}
_COMPILE_EVENTS = {"count": 0}


def default_chunk_size(vocab_size: int, budget_elements: int = 1 << 24) -> int:
    """Rows per chunk so that one fp32 [chunk, V] buffer holds about 2^24 elements (64 MiB)."""
    return max(1, min(8192, budget_elements // max(1, vocab_size)))


def compile_count() -> int:
    """How many times a chunk function has been (re)compiled in this process (for tests/benchmarks)."""
    return _COMPILE_EVENTS["count"]


# Chunk math on the logits z [c, V] (fp32, already divided by τ). Matmuls stay outside (BLAS);
# these elementwise/reduction passes are what torch.compile fuses.

def _chunk_stats(z, y, want_entropy: bool):
    """(lp, lse, entropy) of one chunk."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    lse = (m + torch.log(s)).squeeze(1)
    lp = z.gather(1, y[:, None]).squeeze(1) - lse
    if want_entropy:
        ent = lse - (e * z).sum(-1) / s.squeeze(1)
    else:
        ent = lse.new_zeros(0)
    return lp, lse, ent


def _chunk_dz(z, y, lse, g, e_grad, want_entropy: bool):
    """∂L/∂z for upstream grads g (of lp) and e_grad (of the entropy)."""
    p = torch.exp(z - lse[:, None])
    dz = (-g[:, None] * p).scatter_add(1, y[:, None], g[:, None])
    if want_entropy:
        mean_z = (p * z).sum(-1, keepdim=True)
        dz = dz - e_grad[:, None] * p * (z - mean_z)
    return dz


def _chunk_lp_and_dz(z, y, g):
    """lp and ∂(Σ g·lp)/∂z in one pass (the forward-gradient form)."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    lp = z.gather(1, y[:, None]).squeeze(1) - m.squeeze(1) - torch.log(s).squeeze(1)
    dz = (e * (-g[:, None] / s)).scatter_add(1, y[:, None], g[:, None])
    return lp, dz


def _get(fn, compile: bool):
    if not compile:
        return fn
    key = fn.__name__
    if key not in _COMPILED:
        def counted_backend(gm, example_inputs):
            _COMPILE_EVENTS["count"] += 1
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)

        _COMPILED[key] = torch.compile(fn, dynamic=True, backend=counted_backend)
    return _COMPILED[key]


def _logits(h, w_in, b, inv_temp):
    """fp32 (h Wᵀ + b)/τ for one chunk; in place after the matmul."""
    z = torch.matmul(h, w_in.t())
    z = z.float() if z.dtype != torch.float32 else z
    if b is not None:
        z.add_(b.float())
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _grad_buffers(hidden, weight, need_h: bool, need_w: bool, need_b: bool):
    """grad_h (input dtype), grad_w and grad_b (fp32 accumulators), or None where not needed."""
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    return grad_h, grad_w, grad_b


def _accumulate(dz, h, w_in, grad_h, grad_w, grad_b, sl, inv_temp):
    if inv_temp != 1.0:
        dz = dz * inv_temp
    if grad_b is not None:
        grad_b += dz.sum(0)
    dz_in = dz.to(h.dtype)
    if grad_h is not None:
        grad_h[sl] = torch.matmul(dz_in, w_in)
    if grad_w is not None:
        if h.dtype == torch.float32:
            grad_w.addmm_(dz_in.t(), h[sl])
        else:
            grad_w += torch.matmul(dz_in.t(), h[sl]).float()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, want_entropy, compile):
        n = hidden.shape[0]
        inv_temp = 1.0 / temperature
        stats = _get(_chunk_stats, compile)
        w_in = weight.to(hidden.dtype)
        lps, lses, ents = [], [], []
        for s in range(0, n, chunk_size):
            z = _logits(hidden[s:s + chunk_size], w_in, bias, inv_temp)
            lp, lse, ent = stats(z, targets[s:s + chunk_size], want_entropy)
            lps.append(lp)
            lses.append(lse)
            ents.append(ent)
        lp, lse = torch.cat(lps), torch.cat(lses)
        ent = torch.cat(ents) if want_entropy else lse.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.has_bias, ctx.inv_temp, ctx.chunk_size, ctx.want_entropy, ctx.compile = bias is not None, inv_temp, chunk_size, want_entropy, compile
        ctx.mark_non_differentiable(lse)
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        n = hidden.shape[0]
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.float()
        want_e = ctx.want_entropy and g_ent is not None and g_ent.numel() > 0
        g_ent = g_ent.float() if want_e else g_lp.new_zeros(0)
        dfn = _get(_chunk_dz, ctx.compile)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, need_h, need_w, need_b)
        w_in = weight.to(hidden.dtype)
        for s in range(0, n, ctx.chunk_size):
            sl = slice(s, s + ctx.chunk_size)
            z = _logits(hidden[sl], w_in, bias, ctx.inv_temp)
            dz = dfn(z, targets[sl], lse[sl], g_lp[sl], g_ent[sl] if want_e else g_ent, want_e)
            del z
            _accumulate(dz, hidden, w_in, grad_h, grad_w, grad_b, sl, ctx.inv_temp)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


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
                   compile: bool = True):
    """log softmax((h Wᵀ + b)/τ)[y] per token, fp32 [N] (and the entropy [N] if asked), never
    holding more than one [chunk, V] block of logits. Leading dims of ``hidden``/``targets`` are
    flattened and restored."""
    lead = hidden.shape[:-1]
    h2, y2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    _check(h2, weight, y2, bias, temperature)
    if h2.shape[0] == 0:
        empty = h2.new_zeros(lead, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    lp, ent, _ = _TokenLogprobs.apply(h2, weight, bias, y2, float(temperature), int(chunk), bool(return_entropy), bool(compile))
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
        fused = _get(_chunk_lp_and_dz, compile)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, need_h, need_w, need_b)
        wts = token_weights.float()
        w_in = weight.to(hidden.dtype)
        lps = []
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            z = _logits(hidden[sl], w_in, bias, inv_temp)
            lp, dz = fused(z, targets[sl], wts[sl])
            del z
            lps.append(lp)
            _accumulate(dz, hidden, w_in, grad_h, grad_w, grad_b, sl, inv_temp)
        lp_all = torch.cat(lps)
        total = (wts * lp_all).sum()
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w, need_b, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lp_all)
        return total, lp_all

    @staticmethod
    def backward(ctx, g_total, _g_lp):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b, wdtype, bdtype = ctx.flags
        s = g_total.float()
        # scale the stored gradients in place (no second [V, H] buffer); they are not used again
        if need_h:
            grad_h.mul_(s.to(grad_h.dtype))
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
