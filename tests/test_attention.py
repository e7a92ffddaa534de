"""Grouped eager attention (fdiv_align/lm/attention.py) computes transformers' eager attention: the
same logits for left-padded batches, with and without a KV cache (decoding), in fp32 to round-off
and under bf16 autocast no further from the fp32 result than eager itself."""

import copy

import torch

from fdiv_align.lm.attention import GROUPED_EAGER, grouped_eager_attention, register_grouped_eager
from fdiv_align.lm.models import tiny_model


def _models(seed=4):
    lm = tiny_model(seed=seed)  # 4 query heads over 2 KV heads (g = 2)
    eager = lm.model
    eager.set_attn_implementation("eager")
    grouped = copy.deepcopy(eager)
    grouped.set_attn_implementation(register_grouped_eager())
    assert grouped.config._attn_implementation == GROUPED_EAGER
    return eager, grouped


def _batch(seed=0, B=4, T=9, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    attn[3, :5] = 0
    return ids, attn, (attn.cumsum(-1) - 1).clamp_min(0)


def _prefill_then_decode(model, ids, attn, pos, steps=3):
    """Logits of a prefill on ids[:, :-steps] and then `steps` single-token decoding steps."""
    n = ids.shape[1] - steps
    out = model(input_ids=ids[:, :n], attention_mask=attn[:, :n], position_ids=pos[:, :n], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(n, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=attn[:, :t + 1], position_ids=pos[:, t:t + 1],
                    past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, 1)


def test_fp32_equals_eager_full_and_decoding():
    eager, grouped = _models()
    ids, attn, pos = _batch()
    with torch.no_grad():
        for run in (lambda m: m(input_ids=ids, attention_mask=attn, position_ids=pos).logits,
                    lambda m: _prefill_then_decode(m, ids, attn, pos)):
            want, got = run(eager), run(grouped)
            keep = attn.bool()[..., None].expand_as(want)
            assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5), float((got - want)[keep].abs().max())


def test_bf16_no_worse_than_eager():
    eager, grouped = _models(seed=6)
    ids, attn, pos = _batch(seed=1)
    with torch.no_grad():
        # fp32 eager as the reference (an fp64 copy turns padded rows into NaN: finfo.min + finfo.min = −inf)
        ref = eager(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
        errs = {}
        for name, m in (("eager", eager), ("grouped", grouped)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
            errs[name] = float((out - ref)[attn.bool()].pow(2).mean().sqrt())
    # same products and softmax; only a BLAS accumulation order may differ, hence 10 % on the rms
    assert errs["eager"] > 0 and errs["grouped"] <= errs["eager"] * 1.1, errs


def test_boolean_mask_and_gradients_match_eager():
    """The attention function alone: a boolean mask means the same as its additive form, and the
    gradients of q, k, v equal eager's (repeat_kv) computation's."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    class M(torch.nn.Module):
        num_key_value_groups = 3
        training = False

    g = torch.Generator().manual_seed(0)
    B, Hkv, T, S, D = 2, 2, 4, 6, 8
    q = torch.randn(B, 3 * Hkv, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(B, 1, T, S, generator=g) > 0.3
    allowed[..., 0] = True
    additive = torch.zeros(B, 1, T, S, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    outs = []
    for fn, mask in ((eager_attention_forward, additive), (grouped_eager_attention, additive),
                     (grouped_eager_attention, allowed)):
        o, w = fn(M(), q, k, v, mask, scaling=0.3)
        grads = torch.autograd.grad((o * torch.linspace(-1, 1, D, dtype=torch.float64)).sum(), (q, k, v))
        outs.append((o, w, grads))
    for o, w, grads in outs[1:]:
        # fp64, different kernels (batched vs grouped matmuls): a rounding bound, not bit-equality
        assert torch.allclose(o, outs[0][0], rtol=1e-12, atol=1e-12) and torch.allclose(w, outs[0][1], rtol=1e-12, atol=1e-12)
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(grads, outs[0][2]))
