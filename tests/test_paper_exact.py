"""The exact tasks of benchmarks/paper_exact.py (fdiv_align/testing/exact_tasks.py) on a smaller instance
(5 words + 4 specials, length 3: 729 sequences).

Its exact metrics must equal brute force — every sequence scored by the library's ``score`` (not the
prefix trick of ``enumerate_logprobs``), every text scored by the task's scorer one at a time, the
divergences summed term by term in plain Python — and its runs must be the library's Trainer.
"""

import math

import pytest
import torch

from fdiv_align.lm.scoring import score
from fdiv_align.testing import exact_tasks as pe
from fdiv_align.testing.toy import enumerable_lm, enumerate_logprobs, enumeration_batch

WORDS = ["red", "blue", "cat", "dog", "runs"]
LENGTH = 3
BASE_STEPS = 30


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    results = tmp_path_factory.mktemp("paper_exact")
    return results, pe.base_model(WORDS, LENGTH, steps=BASE_STEPS, cache=results)


def test_prefix_enumeration_equals_scoring_every_sequence():
    lm, seqs = enumerable_lm(seed=3, words=("a", "b", "c"), length=3)
    for context in ("", "a c"):
        fast = enumerate_logprobs(lm.model, lm.tokenizer, 3, context, rows_per_pass=5)
        slow = score(lm.model, enumeration_batch(lm.tokenizer, seqs, context), pad_id=lm.tokenizer.pad_token_id)[1].double()
        assert fast.shape == (len(seqs),)
        assert float((fast - slow).abs().max()) <= 3 * 2.0**-23 * float(slow.abs().max())  # fp32 rounding of a 3-term sum


def _brute(policy, tokenizer, task, i, context):
    """Every metric for context i by brute force: probabilities as Python floats, sums term by term."""
    V = len(tokenizer)
    seqs = torch.tensor(list(__import__("itertools").product(range(V), repeat=LENGTH)))
    batch = enumeration_batch(tokenizer, seqs, context)
    with torch.no_grad():
        lp_pi = score(policy, batch, pad_id=tokenizer.pad_token_id)[1].double()
    lp_pi = lp_pi - torch.logsumexp(lp_pi, 0)
    scorer = task.task.scorer
    log_phi = [float(scorer.log_scores([t], [context])[0]) for t in batch.texts]
    log_P = [float(a) + f for a, f in zip(task.log_a[i], log_phi)]
    Z = sum(math.exp(x) for x in log_P)
    p = [math.exp(x) / Z for x in log_P]
    pi = [math.exp(float(x)) for x in lp_pi]
    a = [math.exp(float(x)) for x in task.log_a[i]]
    kl_p_pi = sum(pk * math.log(pk / qk) for pk, qk in zip(p, pi) if pk > 0)
    m = [(x + y) / 2 for x, y in zip(p, pi)]
    js = 0.5 * sum(x * math.log(x / z) for x, z in zip(p, m) if x > 0) + 0.5 * sum(y * math.log(y / z) for y, z in zip(pi, m) if y > 0)
    tv = 0.5 * sum(abs(x - y) for x, y in zip(p, pi))
    entropy = -sum(y * math.log(y) for y in pi if y > 0)
    kl_pi_a = sum(y * math.log(y / x) for y, x in zip(pi, a) if y > 0)
    if task.name == "reward":
        values = [t.split().count(WORDS[4]) / LENGTH for t in batch.texts]
    elif task.name == "conditional":
        values = [float(context in t.split()) for t in batch.texts]
    else:
        values = [float(t.split().count(WORDS[2]) >= 2) for t in batch.texts]
    alignment = sum(y * v for y, v in zip(pi, values))
    return {"kl_p_pi": kl_p_pi, "js": js, "tv": tv, "entropy": entropy, "kl_pi_a": kl_pi_a, "alignment": alignment}


@pytest.mark.parametrize("name", ["pointwise", "reward", "conditional"])
def test_exact_metrics_equal_brute_force(small, name):
    results, lm = small
    task = pe.ExactTask(name, lm, LENGTH, WORDS)
    policy = pe.base_model(WORDS, LENGTH, BASE_STEPS, cache=results).model  # a fresh copy of the base …
    with torch.no_grad():  # … moved away from a, so that every metric is non-trivial
        for prm in policy.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
    got = task.exact_metrics(policy, lm.tokenizer, LENGTH)
    want = {k: 0.0 for k in ("kl_p_pi", "js", "tv", "entropy", "kl_pi_a", "alignment")}
    for i, c in enumerate(task.contexts):
        for k, v in _brute(policy, lm.tokenizer, task, i, c).items():
            want[k] += v / len(task.contexts)
    for k, v in want.items():
        assert v > 1e-4, k  # non-trivial
        # both sides use fp32 logits of one model through two code paths: a few fp32 ulps per log-prob
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (k, got[k], v)


def test_distributional_lambda_is_exact(small):
    _, lm = small
    task = pe.ExactTask("distributional", lm, LENGTH, WORDS)
    p = task.log_p[0].exp()
    assert float((p * task.values[0]).sum()) == pytest.approx(pe.DIST_TARGET, abs=1e-8)  # E_p[φ] = μ̄ by enumeration


def test_a_cell_trains_with_the_library_trainer_and_lowers_the_exact_divergence(small):
    results, _ = small
    row = pe.run_cell("pointwise", "js", seed=0, lr=1e-2, budget=640, curve=(0, 320, 640), words=WORDS, length=LENGTH,
                      base_steps=BASE_STEPS, cache=results)
    assert row["trainer"] == "fdiv_align.training.trainer.Trainer"
    assert [c["point"] for c in row["curve"]] == [0, 320, 640] and row["curve"][-1]["samples"] == 640
    first, last = row["curve"][0], row["curve"][-1]
    assert last["js"] < 0.8 * first["js"] and last["alignment"] > first["alignment"]
    assert row["objective"] == pytest.approx(last["js"], rel=1e-9)  # the objective is D_js(π‖p) at the end


def test_qrs_check_recovers_p_with_the_exact_acceptance_rate(small):
    results, _ = small
    row = pe.qrs_check("pointwise", n_accept=3000, words=WORDS, length=LENGTH, base_steps=BASE_STEPS, cache=results)
    assert row["accepted"] >= 3000
    assert abs(row["acceptance_z"]) < 4  # accepted count vs the exact rate, in binomial standard errors
    assert row["chi2_pvalue"] > 1e-3 and row["chi2_pvalue_vs_base"] < 1e-6  # matches p, and the test can tell p from a
    assert abs(row["tv_bound_exact"]) <= 64 * 2.0**-52  # β = max P/a: p_β = p (1 − Z_β/Z, rounding of numbers ≈ 1)
