"""A leaner forward for PEFT LoRA linear layers: y = base(x) + s·(x Aᵀ) Bᵀ in two ops.

PEFT's ``lora.Linear.forward`` computes the same sum as ``base(x) + lora_B(lora_A(dropout(x))) *
scaling`` through three sub-module calls, a multiply and an add (plus an input dtype cast). During
decoding (batch × 1 token, 30 layers × 7 adapted projections per step) those calls, not the
arithmetic, dominate the adapters' cost. :func:`install_fast_lora_forward` gives each plain LoRA
``Linear`` an instance ``forward`` that computes

    t = F.linear(x, A)                       (A [r, in]: autocast caches its bf16 cast, a leaf)
    y = addmm(base(x), t, Bᵀ, alpha=s)       (the scaled add fused into one GEMM epilogue)

— the same function of (x, W, A, B, s); under bf16 autocast it rounds once where PEFT rounds after
lora_B, after the scaling and after the add, so it is no less accurate. Anything the lean path does
not cover is handed to PEFT's own forward at call time: adapters disabled (the reference model),
merged weights, several active adapters, LoRA variants (DoRA…), a LoRA bias, active dropout in
training mode, extra forward arguments.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

__all__ = ["install_fast_lora_forward", "uninstall_fast_lora_forward"]


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return peft_forward(self, x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None or (self.training and not isinstance(self.lora_dropout[name], torch.nn.Identity)):
        return peft_forward(self, x)
    result = self.base_layer(x)
    t = F.linear(x.reshape(-1, x.shape[-1]), lora_a.weight)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), t, lora_b.weight.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def install_fast_lora_forward(model: torch.nn.Module) -> int:
    """Give every PEFT ``lora.Linear`` of ``model`` the lean forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def uninstall_fast_lora_forward(model: torch.nn.Module) -> None:
    """Back to PEFT's own forward everywhere."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _fast_forward:
            del module.forward
