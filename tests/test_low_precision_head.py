"""The bf16 output head (kernels/low_precision_head.py) against fp64 on the same bf16-rounded inputs.

A bf16 GEMM rounds its output to 8 significant bits: relative error u = 2⁻⁸. With the row shift c
inside the GEMM the error of a logit is at most u·|z − c| (+ fp32 accumulation, ≤ H·2⁻²⁴·Σ|h||w|),
so for the log-prob lp = z_y − lse:  |δlp| ≤ u·(|z_y − c| + Σ_j p_j |z_j − c|) + 2·acc.
These bounds are what the tests assert; the unshifted GEMM's error is ~u·|z| and must be visibly
larger on logits of SmolLM2's size (|z| ≈ 20–35).
"""

import pytest
import torch

from fdiv_align.kernels import low_precision_weight, shifted_head_logits, token_logprobs, weighted_token_logprob_sum

U = 2.0 ** -8


def _inputs(n=300, h=64, v=1000, scale=23.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    w = w * scale / (hid.norm(dim=-1).mean() * w.norm(dim=-1).mean()) * h ** 0.5 / 3  # top logits of a row ≈ 20–35, like SmolLM2
    hb, wb = hid.bfloat16(), w.bfloat16()
    z64 = hb.double() @ wb.double().T  # exact logits of the rounded inputs
    return hb, wb, z64, g


def _acc_slack(hb, wb):
    """fp32 accumulation error bound per logit: H · 2⁻²⁴ · max Σ_k |h_k w_k|."""
    return hb.shape[1] * 2.0 ** -24 * float((hb.double().abs() @ wb.double().abs().T).max())


def test_shifted_head_logits_error_is_relative_to_the_row_max():
    hb, wb, z64, _ = _inputs()
    z = shifted_head_logits(hb, wb, None, torch.bfloat16).double()
    assert z.dtype == torch.float64 and z.shape == z64.shape
    c = (hb @ wb.T).amax(-1).double()  # the shift the function uses (a bf16 number per row)
    bound = U * (z64 - c[:, None]).abs() + 2 * _acc_slack(hb, wb)
    assert bool(((z - z64).abs() <= bound).all())
    plain = (hb @ wb.T).double()
    top = z64 >= z64.amax(-1, keepdim=True) - 3  # the logits that carry the mass
    err_shift, err_plain = (z - z64).abs()[top].max(), (plain - z64).abs()[top].max()
    assert float(err_shift) < float(err_plain) / 4, (float(err_shift), float(err_plain))


def test_bf16_kernel_logprob_error_bound_and_gain():
    hb, wb, z64, g = _inputs()
    y = torch.multinomial(torch.softmax(z64.float(), -1), 1, generator=g).squeeze(1)  # sampled targets, as in training
    lp = token_logprobs(hb, wb, y, chunk_size=64).double()
    p64 = torch.softmax(z64, -1)
    lp64 = z64.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z64, -1)
    c = (hb.float() * wb[y].float()).sum(-1).bfloat16().double()
    bound = U * ((z64.gather(1, y[:, None]).squeeze(1) - c).abs() + (p64 * (z64 - c[:, None]).abs()).sum(-1))
    bound = bound + 4 * _acc_slack(hb, wb)
    assert bool(((lp - lp64).abs() <= bound).all())
    naive = torch.log_softmax((hb @ wb.T).float(), -1).gather(1, y[:, None]).squeeze(1).double()
    rms = lambda d: float(d.pow(2).mean().sqrt())  # noqa: E731
    assert rms(lp - lp64) < rms(naive - lp64) / 2, (rms(lp - lp64), rms(naive - lp64))


def test_bf16_kernel_gradients_match_fp64_of_rounded_inputs():
    """Gradients of the shifted bf16 kernel (token form and the trainer's weighted form) vs fp64 on
    the same rounded inputs: within bf16 rounding of the gradient itself (relative 2⁻⁷ of its scale)."""
    hb, wb, z64, g = _inputs(n=120, v=700)
    y = torch.multinomial(torch.softmax(z64.float(), -1), 1, generator=g).squeeze(1)  # sampled, as in training
    up = torch.randn(hb.shape[0], generator=g)
    h64, w64 = hb.double().requires_grad_(True), wb.double().requires_grad_(True)
    ((torch.log_softmax(h64 @ w64.T, -1).gather(1, y[:, None]).squeeze(1)) * up).sum().backward()
    for form in ("token", "weighted"):
        h, w = hb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
        if form == "token":
            (token_logprobs(h, w, y, chunk_size=50, vocab_tile=256, saved_logits_budget=0) * up).sum().backward()
        else:
            weighted_token_logprob_sum(h, w, y, up, chunk_size=50)[0].backward()
        for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
            err = (got.double() - ref).abs().max()
            assert float(err) <= 2.0 ** -7 * float(ref.abs().max()), (form, float(err), float(ref.abs().max()))


def test_low_precision_weight_cache_follows_updates_and_autograd():
    w = torch.nn.Parameter(torch.randn(50, 8))
    with torch.no_grad():
        a = low_precision_weight(w, torch.bfloat16)
        assert low_precision_weight(w, torch.bfloat16) is a  # unchanged weight: cached
        w.add_(1.0)  # an optimiser step (in place)
        b = low_precision_weight(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.detach().bfloat16())
    c = low_precision_weight(w, torch.bfloat16)  # grad mode, trainable: a fresh, differentiable cast
    assert c.requires_grad and c.grad_fn is not None
    c.float().sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert low_precision_weight(w, torch.float32) is w


@pytest.mark.parametrize("fp32_head,expected", [(False, torch.bfloat16), (True, None)])
def test_trainer_head_dtype_follows_config(tmp_path, fp32_head, expected):
    from conftest import tiny_cfg

    from fdiv_align.lm.models import tiny_model
    from fdiv_align.training.trainer import Trainer

    tr = Trainer(tiny_cfg(trainer={"precision": "bf16", "fp32_head": fp32_head}), lm=tiny_model(seed=5),
                 output_dir=tmp_path / "a")
    assert tr.plan.head_dtype == expected
    assert Trainer(tiny_cfg(), lm=tiny_model(seed=5), output_dir=tmp_path / "b").plan.head_dtype is None  # fp32 precision: fp32 head
    with pytest.raises(ValueError, match="fp32_head must be true or false, got 'yes'"):
        Trainer(tiny_cfg(trainer={"fp32_head": "yes"}), lm=tiny_model(seed=5), output_dir=tmp_path / "c")


def test_vocab_blocked_decoding_head_is_the_fp32_product_within_its_rounding_bound():
    """The CPU decoding head (blocks of HEAD_BLOCK_ROWS vocabulary rows into a reused buffer) against the
    fp64 product: every logit within the fp32 dot-product bound d·2⁻²⁴·Σ|h_k w_k|; a vocabulary that is
    not a multiple of the block (last block short) and a buffer reused across shapes."""
    from fdiv_align.lm.logprobs import HEAD_BLOCK_ROWS, _vocab_blocked_logits, head_logits

    gen = torch.Generator().manual_seed(3)
    V, d = 2 * HEAD_BLOCK_ROWS + 77, 48
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=gen))
    buffers: dict = {}
    for rows in (5, 3, 5):
        h = torch.randn(rows, d, generator=gen)
        with torch.no_grad():  # as in the decoding loop
            got = head_logits(head, h, None, buffers)
        assert got is buffers["fp32_logits"] and got.shape == (rows, V)
        exact = h.double() @ head.weight.double().t()
        bound = d * 2.0**-24 * (h.double().abs() @ head.weight.double().abs().t())
        assert bool(((got.double() - exact).abs() <= bound).all()), "a logit outside the fp32 rounding bound"
    assert torch.equal(_vocab_blocked_logits(h, head.weight.detach(), {}), got)  # same kernel, same inputs
    assert head_logits(head, h, None, buffers).requires_grad  # with grad on: the plain differentiable GEMM
