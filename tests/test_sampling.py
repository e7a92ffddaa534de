"""Sampling records the log-prob of what it sampled; scoring reproduces it; batching changes nothing."""

import pytest
import torch

from fdiv_align.lm.models import tiny_model
from fdiv_align.lm.sampling import SamplingConfig, make_batch, sample, transformed_logprobs
from fdiv_align.lm.scoring import score

CONTEXTS = ["", "the cat is", "she was very happy and the dog"]  # different lengths → left padding
CONFIGS = [SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(top_k=8),
           SamplingConfig(temperature=1.3, top_k=12, top_p=0.9), SamplingConfig(top_p=0.7)]


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=0)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_recorded_logq_equals_rescored(lm, config):
    batch = sample(lm.model, lm.tokenizer, CONTEXTS, 6, 12, config, generator=torch.Generator().manual_seed(1))
    lengths = batch.mask.sum(-1)
    assert (lengths < 12).any() and (lengths == 12).any(), "want rows that stopped at EOS and rows that did not"
    eos = lm.tokenizer.eos_token_id
    for row, n in zip(batch.tokens, lengths.tolist()):
        if n < 12:
            assert row[n - 1] == eos and (row[n:] == lm.tokenizer.pad_token_id).all()
    with torch.no_grad():
        for side in ["left", "right"]:
            _, seq = score(lm.model, batch, config, side, lm.tokenizer.pad_token_id)
            assert torch.allclose(seq, batch.logq, atol=1e-4, rtol=0), (side, (seq - batch.logq).abs().max())


def test_batch_equals_alone(lm):
    batch = sample(lm.model, lm.tokenizer, CONTEXTS, 4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tok_all, seq_all = score(lm.model, batch, pad_id=lm.tokenizer.pad_token_id)
        for i in range(len(batch)):
            alone = batch.select([i]).trim()
            assert alone.prompt_ids.shape[1] < batch.prompt_ids.shape[1] or i >= 8  # really unpadded
            tok_1, seq_1 = score(lm.model, alone, pad_id=lm.tokenizer.pad_token_id)
            assert abs(float(seq_1[0] - seq_all[i])) < 1e-5
            n = tok_1.shape[1]
            assert torch.allclose(tok_1[0], tok_all[i, :n], atol=1e-5)


def test_sampling_distribution_matches_recorded_logq(lm):
    """One-token samples: empirical frequencies agree with exp(log q) (chi-square, 10,000 draws)."""
    config = SamplingConfig(temperature=1.5, top_k=6)
    batch = sample(lm.model, lm.tokenizer, ["the cat"], 10000, 1, config, generator=torch.Generator().manual_seed(3))
    probs = {}
    for tok, lq in zip(batch.tokens[:, 0].tolist(), batch.token_logq[:, 0].tolist()):
        probs[tok] = lq
    assert len(probs) <= 6  # top-k respected
    counts = torch.bincount(batch.tokens[:, 0], minlength=len(lm.tokenizer)).double()
    p = torch.zeros_like(counts)
    for tok, lq in probs.items():
        p[tok] = torch.tensor(lq).exp()
    assert abs(float(p.sum()) - 1) < 1e-5  # all tokens in the support were seen, and they sum to 1
    expected = 10000 * p[p > 0]
    chi2 = float((((counts[p > 0] - expected) ** 2) / expected).sum())
    assert chi2 < 30.0  # df ≤ 5: P(χ²₅ > 30) ≈ 1.5e-5


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float32))
    lp = transformed_logprobs(logits, SamplingConfig(top_p=0.8))
    assert lp.dtype == torch.float32
    assert torch.isinf(lp[0, 2:]).all() and torch.allclose(lp[0, :2].exp(), torch.tensor([0.625, 0.375], dtype=torch.float32))
    lp = transformed_logprobs(logits, SamplingConfig(top_k=3))
    assert torch.isinf(lp[0, 3]) and torch.allclose(lp[0, :3].exp().sum(), torch.tensor(1.0, dtype=torch.float32))


def test_bad_inputs(lm):
    with pytest.raises(ValueError, match="empty list"):
        sample(lm.model, lm.tokenizer, [], 2, 5)
    with pytest.raises(ValueError, match="exceeds the model window"):
        sample(lm.model, lm.tokenizer, ["the " * 200], 1, 5)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        make_batch(lm.tokenizer, [""], ["the cat", ""])
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(TypeError, match="single string"):
        sample(lm.model, lm.tokenizer, "the cat", 1, 5)


def test_scoring_given_texts(lm):
    batch = make_batch(lm.tokenizer, ["the cat", "she"], ["is very happy", "was"], add_eos=True)
    with torch.no_grad():
        tok, seq = score(lm.model, batch, pad_id=lm.tokenizer.pad_token_id)
        # by hand: one full forward of one sequence, log-softmax, gather
        ids = torch.tensor([[lm.tokenizer.bos_token_id] + lm.tokenizer("the cat is very happy")["input_ids"] + [lm.tokenizer.eos_token_id]])
        logp = torch.log_softmax(lm.model(ids).logits.float(), -1)[0]
        manual = sum(float(logp[i - 1, ids[0, i]]) for i in range(3, ids.shape[1]))
    assert abs(float(seq[0]) - manual) < 1e-5
    assert batch.mask.sum(-1).tolist() == [4, 2]


@pytest.mark.parametrize("V", [5, 256, 1000, 49152])
def test_two_level_draw_is_the_inverse_cdf(V):
    """_draw (block sums, then one block) picks the same token as one fp64 cumulative sum over the
    row, for u anywhere in [0, 1) — block boundaries included — up to fp32 block-sum rounding, and
    never a zero-mass token."""
    from fdiv_align.lm.sampling import DRAW_BLOCK, _draw

    g = torch.Generator().manual_seed(V)
    B = 64
    w = torch.rand(B, V, generator=g) ** 4
    w[w < 0.3] = 0.0  # zero-mass tokens, also at block ends
    w[:, V // 2] += 0.5  # every row has some mass
    w[:, -1] = 0.0
    w[:, 0] = torch.where(torch.arange(B) % 2 == 0, w[:, 0], torch.zeros(B))
    cdf = w.double().cumsum(-1)
    total = cdf[:, -1:]
    nb = -(-V // DRAW_BLOCK)
    # uniforms at random, plus exactly at (and just around) every block boundary's cumulative mass
    bounds = cdf[:, [min(V, (b + 1) * DRAW_BLOCK) - 1 for b in range(nb)]] / total
    u = torch.cat([torch.rand(B, 32, generator=g, dtype=torch.float64), bounds, (bounds - 1e-12).clamp_min(0),
                   torch.zeros(B, 1, dtype=torch.float64)], 1).clamp_max(1 - 1e-16)
    for col in range(u.shape[1]):
        got = _draw(w, u[:, col])
        want = torch.searchsorted(cdf, (u[:, col:col + 1] * total), right=True).squeeze(1).clamp_max(V - 1)
        assert bool((w.gather(1, got[:, None]) > 0).all())
        # identical except where u·total lies within the fp32 block sums' rounding (≤ 256·2⁻²⁴ of the
        # mass summed) of a cumulative sum
        close = (cdf.gather(1, torch.minimum(got, want)[:, None]) - u[:, col:col + 1] * total).abs() <= 256 * 2**-24 * total
        assert bool(((got == want) | close.squeeze(1)).all()), col


@pytest.mark.parametrize("config", [SamplingConfig(0.9), SamplingConfig(1.0, top_k=7)], ids=["temperature", "top_k"])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_static_cache_decoding_draws_what_the_dynamic_cache_draws(lm, config, stop_at_eos, monkeypatch):
    """The CUDA sampler's path (a preallocated StaticCache, one attention mask for the whole loop; on CUDA each
    step is then replayed as a graph) on the CPU, without capture: the same tokens from the same uniforms and the
    same recorded log q (up to summation order), with repeated contexts (prefilled once, the cache reordered)
    and distinct ones, and through a PEFT LoRA model."""
    import dataclasses

    from fdiv_align.lm import sampling
    from fdiv_align.lm.precision import compute_plan

    made = []
    monkeypatch.setattr(sampling, "_static_cache", lambda model, n, make=sampling._static_cache: made.append(n) or make(model, n))
    plan = compute_plan("fp32", False, torch.device("cpu"))
    assert plan.decode == "dynamic"  # the CPU's own choice
    with pytest.raises(ValueError, match="trainer.decode=captured replays decoding steps as CUDA graphs: it needs a CUDA"):
        compute_plan("fp32", False, torch.device("cpu"), decode="captured")
    from peft import LoraConfig, get_peft_model

    contexts = ["the", "a good dog", ""]
    lora = get_peft_model(tiny_model(seed=3).model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    for model, index in ((lm.model, torch.tensor([0, 1, 1, 2, 0, 2, 1])), (lm.model, torch.tensor([2, 0, 1])),
                         (lora, torch.tensor([1, 1, 0]))):
        u = torch.rand(len(index), 12, generator=torch.Generator().manual_seed(len(index)), dtype=torch.float64)
        got = {decode: sample(model, lm.tokenizer, contexts, 0, 12, config, stop_at_eos, context_index=index,
                              uniforms=u, plan=dataclasses.replace(plan, decode=decode)) for decode in ("dynamic", "static")}
        assert torch.equal(got["static"].tokens, got["dynamic"].tokens) and torch.equal(got["static"].mask, got["dynamic"].mask)
        # the attention's products run over the static cache's full length rather than the grown one: another
        # summation order, a few fp32 ulps per token (measured ≤ 1.1e-6 here); 1e-5 bounds that, 10× below the
        # 1e-4 nats the trainer treats as numerical noise (trainer.logratio_resolution)
        diff = float((got["static"].token_logq - got["dynamic"].token_logq).abs().max())
        assert diff <= 1e-5, diff
    assert made == [64] * 3  # the static path ran: prompt width ≤ 4 + 12 positions, rounded up to 64, once per call
