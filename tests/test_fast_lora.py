"""The lean LoRA forward computes PEFT's function: values and every adapter gradient (fp32), no
worse than PEFT against an fp64 reference under bf16 autocast, and PEFT's own path where it must."""

import copy

import pytest
import torch

from fdiv_align.lm.fast_lora import install_fast_lora_forward, uninstall_fast_lora_forward
from fdiv_align.lm.models import tiny_model


def lora_model(dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model

    lm = tiny_model(seed=seed)
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at init would hide the adapters: give them weight
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def ids(seed=3, B=3, T=7, vocab=40):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x).logits.float()
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach().double(), grads


def test_fp32_same_values_and_adapter_gradients():
    model, x = lora_model(), ids()
    want, want_g = logits_and_grads(model, x)
    assert install_fast_lora_forward(model) == 2 * 7  # tiny model: 2 layers × 7 projections
    got, got_g = logits_and_grads(model, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys() and want_g
    for n in want_g:
        assert torch.allclose(got_g[n], want_g[n], atol=1e-5, rtol=1e-4), n
    uninstall_fast_lora_forward(model)
    again, _ = logits_and_grads(model, x)
    assert torch.equal(again, want)  # PEFT's own forward is back


def test_bf16_autocast_no_worse_than_peft():
    """RMS logit error against fp64, pooled over 4 models × 96 tokens: the lean path rounds once where
    PEFT rounds three times, so it must not be systematically worse; the 10% allows for the two
    paths' independent rounding noise (their ratio spread over ±3% on these seeds)."""
    sq_fast = sq_peft = 0.0
    for seed in range(4):
        model, x = lora_model(seed=seed), ids(seed=seed, B=8, T=12)
        want, _ = logits_and_grads(copy.deepcopy(model).double(), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_out, _ = logits_and_grads(model, x)
            install_fast_lora_forward(model)
            fast_out, _ = logits_and_grads(model, x)
        sq_fast += float((fast_out - want).pow(2).mean())
        sq_peft += float((peft_out - want).pow(2).mean())
    assert sq_peft > 0 and sq_fast ** 0.5 <= 1.1 * sq_peft ** 0.5, (sq_fast ** 0.5, sq_peft ** 0.5)


def test_adapters_disabled_is_the_base_model():
    model, x = lora_model(), ids()
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=x).logits
    install_fast_lora_forward(model)
    with torch.no_grad(), model.disable_adapter():
        got = model(input_ids=x).logits
    with torch.no_grad():
        adapted = model(input_ids=x).logits
    assert torch.equal(got, want)
    assert not torch.allclose(adapted, want, atol=1e-3)  # and the adapters do matter here


@pytest.mark.parametrize("training", [True, False])
def test_dropout_in_training_takes_peft_path(training):
    model, x = lora_model(dropout=0.5), ids()
    model.train(training)
    torch.manual_seed(7)
    want = model(input_ids=x).logits
    install_fast_lora_forward(model)
    torch.manual_seed(7)
    got = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)
