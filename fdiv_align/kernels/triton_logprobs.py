"""Token log-probs of a linear head in Triton, for CUDA: the GPU counterpart of :mod:`.token_logprobs`.

For hidden states h [N, H], head weight W [V, H], optional bias b [V], targets y [N] and temperature τ
(z = (h Wᵀ + b) / τ):

    lp_i = z_{i,y_i} − lse_i,   lse_i = logsumexp_j z_{i,j}

**Forward** (:func:`_lse_kernel`): one program per block of ``BLOCK_N`` tokens walks the vocabulary in tiles of
``BLOCK_V`` columns; each tile's logits are a ``tl.dot`` over H in ``BLOCK_H`` slices with fp32 accumulation,
folded at once into a running max and sum (online log-sum-exp) and the target logit. Nothing of size N·V is
written: the kernel stores lse and z_y ([N] fp32 each).

**Backward** (:func:`_grad_kernel`): one program per (token block, vocabulary tile) recomputes its logits, forms

    ∂/∂z_{ij} = g_i (1[j = y_i] − p_{ij}),   p_{ij} = exp(z_{ij} − lse_i)

and adds ∂z W_tile / τ into grad_h, ∂zᵀ h / τ into grad_W and Σ_i ∂z / τ into grad_b (fp32 accumulators,
``tl.atomic_add``), so the
gradient costs the logits once more plus the two gradient matmuls: 4 matmul-equivalents in all against the
3 of a materialising computation — the price of never holding [N, V]. Rows with g_i = 0 (padding) contribute
nothing; rows and columns past N, V are masked. No gradient filtering (Cut Cross-Entropy skips small p_{ij},
trading accuracy for time): every term is added.

Precision: fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (no TF32), so results meet the fp32 tolerance
of the CPU kernels against fp64; bf16/fp16 inputs multiply in that dtype with fp32 accumulation (the logits are
never rounded to bf16), and ∂z is rounded to the input dtype for the gradient matmuls, as a bf16 naive backward
rounds it. Gradients are returned in the input dtype.

Registered as custom operators with ``torch.library.triton_op`` (``fdiv_align::head_logprobs``,
``fdiv_align::head_logprobs_grad``) and an autograd formula, so ``torch.compile`` traces them as single nodes
(no graph break) and Inductor can schedule the Triton kernels with the rest of a compiled step.
:func:`weighted_head_logprob_sum` is the trainer's loss form Σ_i w_i lp_i with w known in the forward: its
gradients are computed in the forward (the grad kernel with g = w) and scaled by the upstream scalar in backward.

The interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors: that is how CI tests them
(tests/test_triton_kernels.py) against the fp64 reference. The compute plan uses them on CUDA only
(fdiv_align/lm/precision.py); the CPU keeps :mod:`.token_logprobs`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["head_logprobs", "weighted_head_logprob_sum", "BLOCKS"]

#: (BLOCK_N, BLOCK_V, BLOCK_H): token rows, vocabulary columns and hidden slice of one program's tile
BLOCKS = (64, 128, 64)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_tau,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """z = (h[rows] W[cols]ᵀ + b[cols]) · inv_tau, fp32 [BLOCK_N, BLOCK_V]."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:  # fp32, or the interpreter (see _ieee)
            acc = tl.dot(hb.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(hb, tl.trans(wb), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_tau


@triton.jit
def _lse_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, zy_ptr, N, V, H, stride_h, stride_w, inv_tau,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_tau,
                        BLOCK_N, BLOCK_V, BLOCK_H, IEEE, HAS_BIAS)
        z = tl.where(cmask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        z_target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=rmask)
    tl.store(zy_ptr + rows, z_target, mask=rmask)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, gh_ptr, gw_ptr, gb_ptr, N, V, H, stride_h, stride_w,
                 inv_tau, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask, cmask = rows < N, cols < V
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_tau,
                    BLOCK_N, BLOCK_V, BLOCK_H, IEEE, HAS_BIAS)
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p) * inv_tau
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(dz, axis=0), mask=cmask)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        dzc = dz.to(wb.dtype)
        if IEEE:
            part_h = tl.dot(dzc.to(tl.float32), wb.to(tl.float32), input_precision="ieee")
            part_w = tl.dot(tl.trans(dzc.to(tl.float32)), hb.to(tl.float32), input_precision="ieee")
        else:
            part_h = tl.dot(dzc, wb)
            part_w = tl.dot(tl.trans(dzc), hb)
        tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], part_h, mask=rmask[:, None] & kmask[None, :])
        tl.atomic_add(gw_ptr + cols[:, None] * H + ks[None, :], part_w, mask=cmask[:, None] & kmask[None, :])


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 dots without TF32 — for fp32 inputs, and under the interpreter for every dtype: its ``tl.dot`` mishandles
    bf16 operands, so they are widened first (bf16 products are exact in fp32, so this is the fp32-accumulated
    bf16 dot the GPU computes, up to summation order)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden and weight must share one of float32/bfloat16/float16, got {hidden.dtype} and {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@triton_op("fdiv_align::head_logprobs", mutates_args={})
def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   inv_tau: float, block_n: int, block_v: int, block_h: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, H = hidden.shape
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    z_target = torch.empty(N, dtype=torch.float32, device=hidden.device)
    wrap_triton(_lse_kernel)[(triton.cdiv(N, block_n),)](
        hidden, weight, weight if bias is None else bias, targets, lse, z_target, N, weight.shape[0], H, hidden.stride(0),
        weight.stride(0), inv_tau, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, IEEE=_ieee(hidden.dtype),
        HAS_BIAS=bias is not None)
    return z_target - lse, lse


@triton_op("fdiv_align::head_logprobs_grad", mutates_args={})
def _head_logprobs_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        lse: torch.Tensor, grad_lp: torch.Tensor, inv_tau: float, block_n: int, block_v: int,
                        block_h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, grad_W, grad_b — zeros [0] without a bias)."""
    N, H = hidden.shape
    V = weight.shape[0]
    grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    grad_b = torch.zeros(V if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    wrap_triton(_grad_kernel)[(triton.cdiv(N, block_n), triton.cdiv(V, block_v))](
        hidden, weight, weight if bias is None else bias, targets, lse, grad_lp.float().contiguous(), grad_h, grad_w,
        grad_w if bias is None else grad_b, N, V, H, hidden.stride(0), weight.stride(0), inv_tau, BLOCK_N=block_n,
        BLOCK_V=block_v, BLOCK_H=block_h, IEEE=_ieee(hidden.dtype), HAS_BIAS=bias is not None)
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), grad_b.to(weight.dtype if bias is None else bias.dtype)


if os.environ.get("TRITON_INTERPRET") == "1":
    # torch derives a triton_op's fake (shape-only) implementation by running it under fake tensors, which the
    # interpreter's kernels do not support (they read the data): state the shapes instead. On CUDA the derived one
    # is used, so that Inductor sees into the kernels.
    @_head_logprobs.register_fake
    def _(hidden, weight, bias, targets, inv_tau, block_n, block_v, block_h):
        return hidden.new_empty(hidden.shape[0], dtype=torch.float32), hidden.new_empty(hidden.shape[0], dtype=torch.float32)

    @_head_logprobs_grad.register_fake
    def _(hidden, weight, bias, targets, lse, grad_lp, inv_tau, block_n, block_v, block_h):
        return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(0 if bias is None else weight.shape[0])


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_tau, block_n, block_v, block_h = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.config = (inv_tau, block_n, block_v, block_h)


def _backward(ctx, grad_lp, grad_lse):
    """The lse output is internal (:func:`head_logprobs` returns lp only), so its gradient is not used."""
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = _head_logprobs_grad(hidden, weight, bias, targets, lse, grad_lp, *ctx.config)
    return grad_h, grad_w, None if bias is None else grad_b, None, None, None, None, None


torch.library.register_autograd("fdiv_align::head_logprobs", _backward, setup_context=_setup_context)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  bias: torch.Tensor | None = None, blocks: tuple[int, int, int] = BLOCKS) -> torch.Tensor:
    """log softmax((h Wᵀ + b) / τ)[y] per token, fp32 [N] (leading dims of ``hidden``/``targets`` flattened and
    restored); differentiable in ``hidden``, ``weight`` and ``bias``. ``blocks``: (BLOCK_N, BLOCK_V, BLOCK_H)."""
    lead = hidden.shape[:-1]
    h2, y2 = hidden.reshape(-1, hidden.shape[-1]).contiguous(), targets.reshape(-1).contiguous()
    _check(h2, weight, y2, temperature)
    lp, _ = _head_logprobs(h2, weight.contiguous(), None if bias is None else bias.contiguous(), y2,
                           1.0 / float(temperature), *blocks)
    return lp.reshape(lead)


class _WeightedSum(torch.autograd.Function):
    """Σ_i w_i lp_i with its gradients computed in the forward (the grad kernel with g = w)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, inv_tau, blocks):
        lp, lse = _head_logprobs(hidden, weight, bias, targets, inv_tau, *blocks)
        grads = _head_logprobs_grad(hidden, weight, bias, targets, lse, token_weights, inv_tau, *blocks)
        ctx.save_for_backward(*grads)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(lp)
        return (token_weights * lp).sum(), lp

    @staticmethod
    def backward(ctx, grad_total, grad_lp):  # grad_lp: lp is returned detached
        grad_h, grad_w, grad_b = (g * grad_total.to(g.dtype) for g in ctx.saved_tensors)
        return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


def weighted_head_logprob_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              token_weights: torch.Tensor, temperature: float = 1.0, bias: torch.Tensor | None = None,
                              blocks: tuple[int, int, int] = BLOCKS) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i w_i lp_i as a differentiable scalar, detached lp [N]): the gradients are computed in the forward,
    so backward costs nothing but a scaling (correct for any upstream gradient of the scalar)."""
    h2, y2, w2 = hidden.reshape(-1, hidden.shape[-1]).contiguous(), targets.reshape(-1).contiguous(), token_weights.reshape(-1)
    _check(h2, weight, y2, temperature)
    if w2.shape != y2.shape:
        raise ValueError(f"token_weights must match targets {tuple(targets.shape)}, got {tuple(token_weights.shape)}")
    total, lp = _WeightedSum.apply(h2, weight.contiguous(), None if bias is None else bias.contiguous(), y2,
                                   w2.detach().float().contiguous(), 1.0 / float(temperature), tuple(blocks))
    return total, lp.detach().reshape(targets.shape)
