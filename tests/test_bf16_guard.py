"""bf16 fast path guard: the bf16 autocast step computes the same loss and pseudo-rewards as fp32,
up to the log-probability error that bf16 arithmetic in the transformer body introduces.

Justification of the tolerance: every log-space quantity stays fp32 (the head's logits too: fp32
GEMMs with ``fp32_head``, else bf16 GEMMs with a per-row shift, kernels/low_precision_head.py), so
bf16 enters only through log π and log a. The pseudo-reward is a function of log t = log π − log P + log Z with
Lipschitz constant L in log t (rkl: 1, js: ½), hence per sample
|R_bf16 − R_fp32| ≤ L(|Δ log π| + |Δ log a| + |Δ log Z|).
We assert that bound (the precision path adds nothing else), and that the per-token log-prob error
stays within 8 units of bf16 round-off (8·2⁻⁸ ≈ 0.031 nats per token).
"""

import pytest
import torch
from conftest import tiny_cfg

from fdiv_align import f_dpg_loss
from fdiv_align.lm.models import tiny_model
import dataclasses

from fdiv_align.lm.precision import PLAIN
from fdiv_align.lm.sampling import sample
from fdiv_align.training.trainer import Trainer

LIPSCHITZ = {"rkl": 1.0, "js": 0.5}


@pytest.mark.parametrize("div", ["rkl", "js"])
@pytest.mark.parametrize("lora", [False, True])  # LoRA: frozen base linears stored in bf16 on the fast path
@pytest.mark.parametrize("fp32_head", [False, True])  # the bf16 head (default) and the fp32 one
def test_bf16_matches_fp32_within_logprob_error(tmp_path, div, lora, fp32_head):
    out = {}
    batch = None
    for ac in ("fp32", "bf16"):
        cfg = tiny_cfg(divergence={"name": div}, trainer={"precision": ac, "fp32_head": fp32_head},
                       model={"lora": lora, "lora_r": 4})
        tr = Trainer(cfg, lm=tiny_model(seed=5), output_dir=tmp_path / ac)
        if batch is None:
            batch = sample(tr.policy.model, tr.policy.tokenizer, ["", "the cat"], 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            log_pi = tr.policy.policy_logprobs(batch).double()
            log_a = tr.policy.reference_logprobs(batch)
        scores = tr.target.log_scores(batch, log_a)
        log_P = torch.where(torch.isneginf(scores.log_P), torch.full_like(scores.log_P, -30.0), scores.log_P)
        log_z = torch.logsumexp(log_P - log_pi, 0) - torch.log(torch.tensor(float(len(batch))))
        res = f_dpg_loss(log_pi.clone().requires_grad_(True), log_pi, log_P, div, log_z)
        out[ac] = {"log_pi": log_pi, "log_a": log_a, "R": res.pseudo_rewards, "loss": float(res.loss), "log_z": log_z}
    f32, b16 = out["fp32"], out["bf16"]
    d_pi = (b16["log_pi"] - f32["log_pi"]).abs()
    d_a = (b16["log_a"] - f32["log_a"]).abs()
    tokens = batch.mask.sum(-1).double()
    assert float((d_pi / tokens).max()) <= 8 * 2**-8 and float((d_a / tokens).max()) <= 8 * 2**-8
    bound = LIPSCHITZ[div] * (d_pi + d_a + abs(float(b16["log_z"] - f32["log_z"])))
    assert ((b16["R"] - f32["R"]).abs() <= bound + 1e-9).all()
    print(f"\n[{div}] max |Δ log π| {float(d_pi.max()):.4f}, max |ΔR| {float((b16['R'] - f32['R']).abs().max()):.4f}, "
          f"loss fp32 {f32['loss']:.5f} bf16 {b16['loss']:.5f}")


def test_adapter_input_cast_skip_is_exact(tmp_path):
    """Skipping PEFT's bf16→fp32 input cast under bf16 autocast (the fast path) changes no bit: the
    same policy log-probs and the same adapter gradients as with PEFT's cast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fdiv_align.lm.fast_lora import uninstall_fast_lora_forward

    cfg = tiny_cfg(trainer={"precision": "bf16"}, model={"lora": True, "lora_r": 4})
    tr = Trainer(cfg, lm=tiny_model(seed=5), output_dir=tmp_path)
    with torch.no_grad():  # move the adapters away from B = 0 so that they contribute
        for name, p in tr.policy.trainable.items():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = sample(tr.policy.model, tr.policy.tokenizer, ["", "the cat"], 4, 6, generator=torch.Generator().manual_seed(1),
                   plan=dataclasses.replace(PLAIN, precision="bf16"))  # bf16 body, fp32 head
    layers = [m for m in tr.policy.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    uninstall_fast_lora_forward(tr.policy.model)  # PEFT's own forward (the path that casts) for this check
    results = []
    for enabled in (False, True):
        for m in layers:
            m.cast_input_dtype_enabled = enabled
        tr.policy.model.zero_grad(set_to_none=True)
        lp = tr.policy.policy_logprobs(batch)
        lp.sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in tr.policy.trainable.values()]))
    (lp0, g0), (lp1, g1) = results
    assert torch.equal(lp0, lp1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_attention_implementation_is_applied_and_checked(tmp_path):
    tr = Trainer(tiny_cfg(), lm=tiny_model(seed=5), output_dir=tmp_path / "a")
    assert tr.policy.model.config._attn_implementation == "fdiv_grouped_eager"  # the CPU default
    tr = Trainer(tiny_cfg(model={"attn_implementation": "sdpa"}), lm=tiny_model(seed=5), output_dir=tmp_path / "b")
    assert tr.policy.model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='no_such_kernel'"):
        Trainer(tiny_cfg(model={"attn_implementation": "no_such_kernel"}), lm=tiny_model(seed=5), output_dir=tmp_path / "c")
