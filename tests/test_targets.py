"""Scorers on hand-made texts, the target algebra, λ fitting on the exact toy, bad scorers."""

import math

import pytest
import torch

from fdiv_align.lm.models import tiny_model
from fdiv_align.lm.sampling import sample
from fdiv_align.targets import (AnyWord, BaseLM, BooleanScorer, CompilesAsPython, DistributionalConstraint,
                                InfeasibleConstraintError, ProbabilityScorer, RegexMatch, RewardScorer, ScorerError,
                                VaderSentiment, WordPresent, fit_lambda, get_task, load_contexts)
from fdiv_align.targets.tasks import female_feature, science_words, stdlib_signatures
from fdiv_align.testing.toy import ToyAR

NEG = -math.inf


def test_word_present_whole_words_and_case():
    s = WordPresent("amazing")
    texts = ["an amazing day", "amazingly good", "Amazing!", "so amazing.", "unamazing"]
    assert s.log_scores(texts).tolist() == [0.0, NEG, NEG, 0.0, NEG]
    s = WordPresent("amazing", case_sensitive=False)
    assert s.log_scores(texts).tolist() == [0.0, NEG, 0.0, 0.0, NEG]


def test_any_word_and_regex_and_science_list():
    words = science_words()
    assert len(words) == 48 and "atom" in words
    s = AnyWord(words)
    assert s.log_scores(["the atom split", "atomic bomb", "Biology is fun", "big data"]).tolist() == [0.0, NEG, NEG, 0.0]
    r = RegexMatch(r"\d{3}")
    assert r.log_scores(["call 555 now", "no digits 12"]).tolist() == [0.0, NEG]


def test_compiles_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"import os\nopen({str(marker)!r}, 'w').write('x')\n"
    s = CompilesAsPython()
    texts = [payload, "return x +", "pass\n", "return (1\n"]
    contexts = ["", "def f(x):\n    ", "def g():\n    ", "def h():\n    "]
    assert s.log_scores(texts, contexts).tolist() == [0.0, NEG, 0.0, NEG]
    assert not marker.exists()  # compiled, never run
    assert s.log_scores(["\x00"], [""]).tolist() == [NEG]  # null byte: ValueError → does not compile


def test_vader_and_reward_scorer():
    v = VaderSentiment(beta=0.5)
    r = v.alignment(["I love this, it is wonderful!", "This is terrible and awful."], ["", ""])
    assert r[0] > 0.5 and r[1] < -0.5
    assert torch.allclose(v.log_scores(["I love this, it is wonderful!"]), r[:1] / 0.5)
    rs = RewardScorer(lambda t, c: [len(x) for x in t], beta=2.0, name="length")
    assert rs.log_scores(["ab", "abcd"]).tolist() == [1.0, 2.0]


def test_bad_scorers_are_named_with_the_text():
    nan = RewardScorer(lambda t, c: [0.0, float("nan")], name="nanny")
    with pytest.raises(ScorerError, match="nanny.*'second'"):
        nan.log_scores(["first", "second"])
    boom = RewardScorer(lambda t, c: 1 / 0, name="boom")
    with pytest.raises(ScorerError, match="boom.*ZeroDivisionError"):
        boom.log_scores(["x"])
    neg = ProbabilityScorer(lambda t, c: [0.5, -0.1], name="prob")
    with pytest.raises(ScorerError, match="prob.*-0.1.*'b'"):
        neg.log_scores(["a", "b"])
    weird = BooleanScorer(lambda t, c: "yes", name="weird")
    with pytest.raises(ScorerError, match="weird"):
        weird.log_scores(["a"])
    with pytest.raises(ValueError, match="beta"):
        RewardScorer(lambda t, c: [0.0], beta=0)


def test_target_algebra_adds_log_scores():
    lm = tiny_model(seed=0)
    base = BaseLM(lm.model, lm.tokenizer)
    s1, s2 = WordPresent("cat"), RewardScorer(lambda t, c: [float(len(x.split())) for x in t], beta=4.0, name="len")
    target = base * s1 * s2
    assert [s.name for s in target.scorers] == ["word:cat", "len"]
    batch = sample(lm.model, lm.tokenizer, ["", "the"], 8, 8, generator=torch.Generator().manual_seed(0))
    scores = target.log_scores(batch)
    expected = base.logprobs(batch) + s1.log_scores(batch.texts) + s2.log_scores(batch.texts)
    same = torch.isneginf(expected) == torch.isneginf(scores.log_P)
    assert same.all()
    fin = torch.isfinite(expected)
    assert torch.allclose(scores.log_P[fin], expected[fin])
    assert torch.allclose(scores.log_a, base.logprobs(batch))
    assert torch.equal(scores.alignment, target.alignment(batch).double())  # from the log-scores, no second pass
    # the same factor twice counts twice (components keep both)
    twice = base * s2 * s2
    assert torch.allclose(twice.log_scores(batch).log_phi, 2 * s2.log_scores(batch.texts))


def _toy_feats(x):
    return torch.stack([(x == 0).sum(-1), (x == 1).sum(-1)], 1).double()


def _exact_moments(a, lambdas):
    seqs = a.all_sequences()
    with torch.no_grad():
        p = torch.softmax(a.log_prob(seqs) + _toy_feats(seqs) @ lambdas, 0)
    phi = _toy_feats(seqs)
    mean = p @ phi
    return mean, (p[:, None] * (phi - mean) ** 2).sum(0)


def test_lambda_fit_exact_in_the_many_sample_limit():
    """The enumeration weighted by a is the infinite-sample limit of samples of a: the fitted λ gives
    exact moments equal to μ̄ to 1e-6 (≪ 1e-3)."""
    a = ToyAR(3, 4, seed=1)
    mu = torch.tensor([1.6, 0.9], dtype=torch.float64)
    seqs = a.all_sequences()
    with torch.no_grad():
        fit = fit_lambda(_toy_feats(seqs), mu, log_a=a.log_prob(seqs))  # Σ_x a(x) e^{λφ(x)}
    mean, _ = _exact_moments(a, fit.lambdas)
    assert torch.allclose(mean, mu, atol=1e-6), (mean, fit)
    assert fit.iterations < 30


def test_lambda_fit_on_samples_within_statistical_error():
    """1M samples of a proposal q ≠ a: exact moments of a·exp(λ̂·φ) within 4.5 SE of μ̄, with
    SE = sd_p(φ)/√ESS, and within 1e-2."""
    a, q = ToyAR(3, 4, seed=1), ToyAR(3, 4, seed=1)
    with torch.no_grad():
        q.logits.add_(0.2 * torch.randn(q.logits.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    mu = torch.tensor([1.6, 0.9], dtype=torch.float64)
    x, lq = q.sample(1_000_000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fit = fit_lambda(_toy_feats(x), mu, log_a=a.log_prob(x), log_q=lq)
    mean, var = _exact_moments(a, fit.lambdas)
    se = (var / fit.ess).sqrt()
    assert ((mean - mu).abs() < 4.5 * se).all(), (mean, se, fit)
    assert torch.allclose(fit.achieved, mu, atol=1e-8)
    assert float((mean - mu).abs().max()) < 1e-2


def test_lambda_fit_refuses_infeasible():
    phi = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(InfeasibleConstraintError, match="outside"):
        fit_lambda(phi, [1.0])  # on the boundary: λ = +∞
    with pytest.raises(InfeasibleConstraintError, match="outside"):
        fit_lambda(phi, [1.5])
    # jointly infeasible although each coordinate is in range: φ₁ + φ₂ = 1 always, μ̄ sums to 1.2
    phi2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    with pytest.raises(InfeasibleConstraintError):
        fit_lambda(phi2, [0.6, 0.6])


def test_distributional_constraint_scorer():
    c = DistributionalConstraint([female_feature], [0.5], names=["female"])
    with pytest.raises(ScorerError, match="not fitted"):
        c.log_scores(["she"])
    texts = ["she said", "he said", "her and him and her", "nothing"]
    assert female_feature(texts) == [1.0, 0.0, 1.0, 0.0]
    fit = c.fit(texts, [""] * 4)
    assert abs(float(fit.achieved[0]) - 0.5) < 2e-9 * 0.5  # relative: the fit's convergence tolerance
    assert torch.allclose(c.log_scores(texts), torch.tensor(female_feature(texts), dtype=torch.float64) * fit.lambdas[0])


def test_contexts_files(tmp_path):
    (tmp_path / "c.txt").write_text("first\n\nsecond\n")
    (tmp_path / "c.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"q": "a"}\n')
    assert load_contexts(tmp_path / "c.txt") == ["first", "second"]
    assert load_contexts(str(tmp_path / "c.jsonl")) == ["a", "b"]
    with pytest.raises(ValueError, match="prompt/context/text"):
        load_contexts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_contexts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no contexts"):
        load_contexts([])


def test_builtin_tasks_build():
    for name in ["amazing", "science", "sentiment", "female", "code_compiles"]:
        task = get_task(name)
        assert task.name == name and task.contexts
    sigs = stdlib_signatures(16)
    assert all(s.startswith("def ") and s.endswith(":\n    ") for s in sigs)
    assert all(CompilesAsPython().log_scores(["pass"], [s]).item() == 0.0 for s in sigs)
    with pytest.raises(ValueError, match="unknown task 'amazin'"):
        get_task("amazin")
