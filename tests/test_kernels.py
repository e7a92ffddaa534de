"""Fused token log-prob kernel against an fp64 reference: values, entropy, every gradient."""

import importlib

import pytest
import torch

from fdiv_align.kernels import (
    reference_token_logprobs,
    token_logprobs,
    weighted_token_logprob_sum,
)
from fdiv_align.lm.sampling import SamplingConfig, transformed_logprobs
from kernel_cases import BUDGETS, SHAPES, grads_of, make, ours, ref


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("budget", BUDGETS)
def test_fp32_matches_fp64_reference(shape, compile, temperature, budget):
    N, H, V, chunk, tile = shape
    h, w, b, y, gl, ge = make(N, H, V, seed=N + V)
    r_lp, r_ent, r_grads = grads_of(ref, h, w, b, y, gl, ge, torch.float64, temperature)
    lp, ent, grads = grads_of(ours(compile, chunk, tile, BUDGETS[budget](V)), h, w, b, y, gl, ge, torch.float32, temperature)
    for got, want, name in [(lp, r_lp, "logprob"), (ent, r_ent, "entropy")] + list(zip(grads, r_grads, ["hidden", "weight", "bias"])):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, float((got - want).abs().max()))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("budget", ["recompute", "keep13"])
def test_bf16_no_worse_than_naive_bf16(shape, budget):
    """Cut Cross-Entropy criterion: error of our bf16 result vs fp64 ≤ error of the naive bf16 computation + 1e-2·scale."""
    N, H, V, chunk, tile = shape
    h, w, b, y, gl, ge = make(N, H, V, seed=1, bias=False)
    r_lp, r_ent, r_grads = grads_of(ref, h, w, b, y, gl, ge, torch.float64, 1.0)
    n_lp, n_ent, n_grads = grads_of(ref, h, w, b, y, gl, ge, torch.bfloat16, 1.0)
    lp, ent, grads = grads_of(ours(True, chunk, tile, BUDGETS[budget](V)), h, w, b, y, gl, ge, torch.bfloat16, 1.0)
    for got, naive, want, name in [(lp, n_lp, r_lp, "logprob"), (ent, n_ent, r_ent, "entropy"),
                                   (grads[0], n_grads[0], r_grads[0], "hidden"), (grads[1], n_grads[1], r_grads[1], "weight")]:
        err, naive_err = (got - want).abs().max(), (naive - want).abs().max()
        assert err <= naive_err + 1e-2 * want.abs().max(), (name, float(err), float(naive_err))


def test_temperature_matches_sampler():
    h, w, b, y, *_ = make(20, 16, 64, seed=2, bias=False)
    for T in (0.5, 1.0, 1.7):
        want = transformed_logprobs(h @ w.T, SamplingConfig(temperature=T)).gather(1, y[:, None]).squeeze(1)
        got = token_logprobs(h.float(), w.float(), y, temperature=T, compile=False)
        assert torch.allclose(got.double(), want.double(), atol=1e-5)


def test_leading_dims_and_errors():
    h, w, b, y, *_ = make(12, 8, 30, seed=3)
    lp = token_logprobs(h.float().view(3, 4, 8), w.float(), y.view(3, 4), compile=False)
    assert lp.shape == (3, 4)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, w, y[:5])


def test_backward_in_several_token_blocks(monkeypatch):
    """Above BACKWARD_ROW_BLOCK tokens the backward runs block by block (grad_W, grad_b summed over
    blocks): same values as the fp64 reference with a block of 16 tokens and a ragged last block."""
    impl = importlib.import_module("fdiv_align.kernels.token_logprobs")  # the module, not the function

    monkeypatch.setattr(impl, "BACKWARD_ROW_BLOCK", 16)
    h, w, b, y, gl, ge = make(53, 12, 90, seed=6)
    r_lp, r_ent, r_grads = grads_of(ref, h, w, b, y, gl, ge, torch.float64, 0.9)
    lp, ent, grads = grads_of(ours(False, 10, 40, budget=7 * 90), h, w, b, y, gl, ge, torch.float32, 0.9)
    for got, want in [(lp, r_lp), (ent, r_ent)] + list(zip(grads, r_grads)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())


def test_second_backward_with_kept_logits_is_refused():
    """Kept logits are overwritten by the first backward: a second one must fail loudly, and with
    saved_logits_budget=0 (nothing kept) it must give the same gradient again."""
    h, w, b, y, gl, _ = make(9, 6, 20, seed=8)
    hf = h.float().requires_grad_(True)
    lp = token_logprobs(hf, w.float(), y, compile=False, saved_logits_budget=1 << 26)
    (lp * gl.float()).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (lp * gl.float()).sum().backward()
    hf.grad = None
    lp = token_logprobs(hf, w.float(), y, compile=False, saved_logits_budget=0)
    (lp * gl.float()).sum().backward(retain_graph=True)
    first = hf.grad.clone()
    (lp * gl.float()).sum().backward()
    assert torch.allclose(hf.grad, 2 * first)


def test_second_backward_through_weighted_sum_is_refused():
    """The weighted sum's gradients are made in the forward and scaled in place by the backward: a
    second backward (retain_graph) would return a wrongly scaled gradient, so it must fail loudly."""
    h, w, b, y, gl, _ = make(9, 6, 20, seed=8)
    hf = h.float().requires_grad_(True)
    total, _ = weighted_token_logprob_sum(hf, w.float(), y, gl.float(), compile=False)
    (3.0 * total).backward(retain_graph=True)
    first = hf.grad.clone()
    with pytest.raises(RuntimeError, match="weighted_token_logprob_sum: backward ran twice"):
        (3.0 * total).backward()
    assert torch.equal(hf.grad, first)  # nothing was added by the refused call


def test_bad_chunk_and_tile_are_refused():
    h, w, b, y, *_ = make(6, 4, 10, seed=7)
    with pytest.raises(ValueError, match="vocab_tile must be a positive"):
        token_logprobs(h, w, y, vocab_tile=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        token_logprobs(h, w, y, chunk_size=-3)
    with pytest.raises(ValueError, match="saved_logits_budget must be ≥ 0"):
        token_logprobs(h, w, y, saved_logits_budget=-1)


def test_weighted_sum_matches_reference():
    h, w, b, y, gl, _ = make(37, 16, 101, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    (reference_token_logprobs(*leaves[:2], y, 0.8, bias=leaves[2]) * gl).sum().mul(3.0).backward()
    want = [t.grad for t in leaves]
    leaves2 = [t.float().clone().requires_grad_(True) for t in (h, w, b)]
    total, lp = weighted_token_logprob_sum(leaves2[0], leaves2[1], y, gl.float(), 0.8, chunk_size=8, bias=leaves2[2])
    (3.0 * total).backward()
    for got, exp in zip([t.grad for t in leaves2], want):
        assert torch.allclose(got.double(), exp, atol=1e-5, rtol=1e-4)


def test_peft_wrapped_head_is_refused():
    from fdiv_align.lm.logprobs import plain_linear_head

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3, 2))

    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        plain_linear_head(Wrapped())
