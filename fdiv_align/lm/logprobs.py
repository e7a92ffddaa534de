"""Log-probabilities of tokens under the sampling transform, and the output head that produces them.

One place for what sampling, scoring and the update share: ``SamplingConfig`` and
``transformed_logprobs`` (the distribution actually sampled from), the accurate fp32 log-softmax, the
output head's logits (fp32, or bf16 GEMMs with fp32 logits) and the one glue that plugs the fused
kernels of :mod:`fdiv_align.kernels` into scoring and the surrogate (:func:`fused_token_logprobs`,
:func:`fused_weighted_logprob_sum`: the head's operands, and the plan's kernel — torch or Triton). The
kernels import nothing of the package; this module imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import low_precision_weight, shifted_head_logits, token_logprobs, weighted_token_logprob_sum

__all__ = ["SamplingConfig", "transformed_logprobs", "log_softmax_fp32", "head_logits", "head_inputs",
           "plain_linear_head", "fused_head_weights", "fused_head_operands", "fused_token_logprobs",
           "fused_weighted_logprob_sum"]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def transformed_logprobs(logits: torch.Tensor, config: SamplingConfig = SamplingConfig()) -> torch.Tensor:
    """log-probabilities (fp32) of the distribution sampled from under ``config``; −inf where cut."""
    logits = logits.float()
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        cut_sorted = mass_before >= config.top_p  # keep tokens until the kept mass reaches top_p
        cut = torch.zeros_like(cut_sorted).scatter(-1, order, cut_sorted)
        logits = logits.masked_fill(cut, float("-inf"))
    return log_softmax_fp32(logits)


def log_softmax_fp32(z: torch.Tensor) -> torch.Tensor:
    """z − max − log Σ exp(z − max) over the last axis, in fp32 with torch's cascade ``sum``. Unlike
    ``torch.log_softmax``'s fp32 kernel — biased by +7·10⁻⁶ per token on SmolLM2's logits against fp64
    (``python benchmarks/head_precision.py``), which adds up over a sequence — its error is the rounding
    of z − max (mean +6·10⁻⁹ there), like the sampler's log q(token) = log w − log Σ w with w = exp(z − max), so recorded
    and rescored log-probs agree."""
    m = z.amax(-1, keepdim=True)
    shifted = z - m.masked_fill(torch.isinf(m), 0.0)  # a row cut entirely to −inf stays −inf, not NaN
    return shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))


def head_logits(head, hidden: torch.Tensor, head_dtype: torch.dtype | None = None,
                buffers: dict | None = None) -> torch.Tensor:
    """fp32 logits of the output head, outside any autocast: the backbone may run in bf16, but the
    logits (and hence every log-probability the estimator sees) are fp32. ``head_dtype`` (bf16): a
    plain linear head's GEMMs run in that dtype, shifted per row so that the fp32 logits near the
    top keep their precision (:mod:`fdiv_align.kernels.low_precision_head`); None = fp32 GEMMs.
    ``buffers``: reused output memory for repeated calls of one shape (the decoding loop)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if type(head) is torch.nn.Linear and head_dtype not in (None, torch.float32):
            return shifted_head_logits(hidden, head.weight, head.bias, head_dtype, buffers)
        if type(head) is torch.nn.Linear:
            bias = None if head.bias is None else head.bias.float()
            if buffers is not None and hidden.device.type == "cpu" and bias is None and not torch.is_grad_enabled():
                return _vocab_blocked_logits(hidden.float(), head.weight.float(), buffers)
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
        weight = getattr(head, "weight", None)
        return head(hidden.to(weight.dtype) if weight is not None else hidden).float()


HEAD_BLOCK_ROWS = 2048  # vocabulary rows per GEMM of a CPU decoding step's head


def _vocab_blocked_logits(hidden: torch.Tensor, weight: torch.Tensor, buffers: dict) -> torch.Tensor:
    """hidden [B, d] @ weightᵀ [d, V] in blocks of HEAD_BLOCK_ROWS vocabulary rows, each written into a
    reused [B, V] buffer: the same products as one ``linear`` (each logit is one d-long dot product),
    but a block of the weight stays in cache while the few rows of a decoding step use it — on CPU a
    single [B ≤ 64, 576] × [576, 49152] GEMM runs at a fraction of the GEMM peak
    (``python benchmarks/decode_head.py`` prints both timings)."""
    B, V = hidden.shape[0], weight.shape[0]
    out = buffers.get("fp32_logits")
    if out is None or out.shape != (B, V):
        out = buffers["fp32_logits"] = torch.empty((B, V), dtype=torch.float32, device=hidden.device)
    for start in range(0, V, HEAD_BLOCK_ROWS):
        block = weight[start:start + HEAD_BLOCK_ROWS]
        torch.mm(hidden, block.t(), out=out[:, start:start + block.shape[0]])
    return out


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


def fused_head_operands(head, hidden: torch.Tensor, config, head_dtype: torch.dtype | None):
    """(hidden, weight, bias) for the fused kernels of :mod:`fdiv_align.kernels` — the one glue between the
    model's head and them: the plain linear head's weight (anything else, or top-k/top-p, is refused:
    :func:`fused_head_weights`), hidden and weight in the head's GEMM dtype (:func:`head_inputs`), bias fp32."""
    weight, bias = fused_head_weights(head, config)
    hidden, weight = head_inputs(hidden, weight, head_dtype)
    return hidden, weight, None if bias is None else bias.float()


def fused_token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, config, head_dtype: torch.dtype | None,
                         compile: bool = True, kernel: str = "torch") -> torch.Tensor:
    """[B, T] log-probs of ``targets`` under the head and the sampler's temperature, by the fused kernel
    (never materialising [B·T, V] logits); ``head_dtype`` (e.g. bf16): the head's GEMMs in that dtype
    (fp32 logits, see :mod:`fdiv_align.kernels.low_precision_head`); None = fp32. ``kernel``: the plan's
    (:attr:`fdiv_align.lm.precision.ComputePlan.kernel`)."""
    h, w, b = fused_head_operands(head, hidden, config, head_dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the head's own precision, like head_logits
        if kernel == "triton":
            from ..kernels.triton_logprobs import head_logprobs

            return head_logprobs(h, w, targets, config.temperature, bias=b)
        return token_logprobs(h, w, targets, temperature=config.temperature, bias=b, compile=compile)


def fused_weighted_logprob_sum(hidden: torch.Tensor, head, targets: torch.Tensor, token_weights: torch.Tensor, config,
                               head_dtype: torch.dtype | None, compile: bool = True,
                               kernel: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·log π as a differentiable scalar, detached [B, T] token log-probs) by the plan's fused kernel, its
    gradients computed in the forward (the weights are known before it, as f-DPG's coefficients are); the
    operands as in :func:`fused_token_logprobs`."""
    h, w, b = fused_head_operands(head, hidden, config, head_dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the head's own precision, like head_logits
        if kernel == "triton":
            from ..kernels.triton_logprobs import weighted_head_logprob_sum

            return weighted_head_logprob_sum(h, w, targets, token_weights, config.temperature, bias=b)
        return weighted_token_logprob_sum(h, w, targets, token_weights, config.temperature, bias=b, compile=compile)
