"""The output head in bf16 with fp32 logits: GEMMs in the low-precision dtype, rounding kept small.

A bf16 GEMM accumulates in fp32 but rounds its *output* to bf16: a logit z ≈ 25 (SmolLM2's top
logits) comes back with an error of up to 2⁻⁸·25 ≈ 0.1 nats. We shift every row by a constant c_i
inside the GEMM — out = addmm(−c, h, Wᵀ), the subtraction done on the fp32 accumulator — and add c
back in fp32:

    z_ij = c_i + round_bf16(Σ_k h_ik W_jk − c_i),   |error| ≤ 2⁻⁸ |z_ij − c_i|   (+ fp32 accumulation)

so the logits near c_i — for a likely target, the ones that carry the probability mass — are nearly
exact (for an unlikely target, z_y far below the top, the log-sum-exp's error grows to about
2⁻⁸·(z_max − z_y), the size of the unshifted GEMM's error u·|z|). c_i is itself
a bf16 number (so −c_i enters the GEMM exactly): the target logit when the target is known (scoring,
the update: c_i = bf16(h_i · W_{y_i}), exact products of bf16 inputs summed in fp32), else the row
maximum of a first, plain bf16 GEMM (sampling: two GEMMs, still ~2× cheaper than one fp32 GEMM on
CPU). What remains is the rounding of the *inputs* h and W to bf16 (`python
benchmarks/head_precision.py`, SmolLM2-135M: rms 0.011 nats per token log-prob, against 0.029 for a
plain bf16 head GEMM and 0.026 for the bf16 transformer body).
"""

from __future__ import annotations

import torch

__all__ = ["low_precision_weight", "shifted_matmul", "target_shift", "shifted_head_logits"]


def low_precision_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` cast to ``dtype``, cached on the parameter while it is unchanged (its version
    counter, bumped by every in-place update such as an optimiser step, is the key). A weight that
    needs a gradient in grad mode is cast afresh, so the cast stays in the autograd graph."""
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad and torch.is_grad_enabled():
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    cached = getattr(weight, "_fdiv_low_precision", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._fdiv_low_precision = cached
    return cached[1]


def shifted_matmul(h: torch.Tensor, w: torch.Tensor, shift: torch.Tensor, low_out: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 h wᵀ for low-precision h [N, H], w [V, H]: the GEMM returns round(h wᵀ − shift) in the
    inputs' dtype (``shift`` [N], same dtype, subtracted on the fp32 accumulator); shift is added
    back in fp32. ``low_out``/``out``: optional [N, V] buffers (inputs' dtype / fp32) to write into."""
    z = torch.addmm(-shift[:, None], h, w.t(), out=low_out)
    if out is None:
        return torch.add(z, shift.float()[:, None])  # fp32 by type promotion: one pass
    return out.copy_(z).add_(shift.float()[:, None])


def target_shift(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """c_i = h_i · w_{y_i} computed in fp32 (exact products of the low-precision inputs), rounded to
    the inputs' dtype: the shift that makes the target logits (and their neighbours) nearly exact."""
    return (h.float() * w[targets].float()).sum(-1).to(h.dtype)


def shifted_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        dtype: torch.dtype, buffers: dict | None = None) -> torch.Tensor:
    """fp32 logits [..., V] of a linear head computed with ``dtype`` GEMMs, shifted by each row's
    maximum (found by a first plain GEMM): for sampling, where no target is known. ``buffers`` (a
    dict the caller keeps across calls of one shape, e.g. the decoding steps) holds the [rows, V]
    outputs so that each step writes into memory already mapped instead of allocating ~6 MB twice
    (fresh large allocations page-fault on every first touch: several ms per step on CPU); the
    returned logits then live in that buffer until the next call."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = low_precision_weight(weight, dtype)
    shape = (h.shape[0], w.shape[0])
    if buffers is None:
        buffers = {}
    low, z = buffers.get("low"), buffers.get("fp32")
    if low is None or low.shape != shape or low.dtype != dtype or low.device != h.device:
        low = buffers["low"] = torch.empty(shape, dtype=dtype, device=h.device)
        z = buffers["fp32"] = torch.empty(shape, dtype=torch.float32, device=h.device)
    shift = torch.matmul(h, w.t(), out=low).amax(-1)  # a bf16 number per row, near the top logit
    shifted_matmul(h, w, shift, low_out=low, out=z)
    if bias is not None:
        z.add_(bias.float())
    return z.reshape(*lead, w.shape[0])
