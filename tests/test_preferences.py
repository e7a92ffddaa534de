"""Preference data (fdiv_align/preferences/data.py) and the Bradley–Terry loss: clear errors on bad rows,
atomic writes, Bradley–Terry labelling at the right rate, and the MLE recovering a known reward."""

import json
import math

import pytest
import torch

from fdiv_align.objectives.preference_loss import bradley_terry_loss
from fdiv_align.preferences import (PreferenceDataError, PreferencePair, load_preferences, synthetic_preferences,
                                    write_preferences)

GOOD = {"prompt": "p", "chosen": "a fine day", "rejected": "a bad day"}


@pytest.mark.parametrize("line,message", [
    ("{not json", r":2: not valid JSON"),
    (json.dumps({"prompt": "p", "chosen": "x"}), r":2: missing key\(s\) rejected"),
    (json.dumps({**GOOD, "score": 1}), r":2: unknown key\(s\) score"),
    (json.dumps({**GOOD, "chosen": 3}), r":2: 'chosen' must be a string, got int"),
    (json.dumps({**GOOD, "rejected": "  "}), r":2: 'rejected' is empty"),
    (json.dumps({**GOOD, "rejected": GOOD["chosen"]}), r":2: chosen and rejected are the same text"),
    (json.dumps({**GOOD, "margin": -1}), r":2: 'margin' must be a finite number ≥ 0"),
    (json.dumps(GOOD), r":2: the same \(prompt, chosen, rejected\) as line 1"),
    ("[1, 2]", r":2: expected a JSON object, got list"),
])
def test_bad_rows_are_named_by_line(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(PreferenceDataError, match=message):
        load_preferences(path)


def test_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        load_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_preferences(tmp_path / "none.jsonl")


def test_write_is_atomic_and_round_trips(tmp_path):
    pairs = [PreferencePair("p", "a", "b"), PreferencePair("q", "c", "d", 0.5)]
    path = write_preferences(pairs, tmp_path / "out" / "prefs.jsonl")
    assert load_preferences(path) == pairs
    with pytest.raises(PreferenceDataError, match="pair 1: chosen and rejected are the same text"):
        write_preferences([PreferencePair("p", "a", "b"), PreferencePair("p", "x", "x")], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists() and not list(tmp_path.glob("bad.jsonl*"))


def test_synthetic_labels_follow_bradley_terry():
    """"good" beats "bad" with probability σ(Δr/τ): the observed count within 4 binomial s.e."""
    n, tau = 20_000, 0.5
    reward = lambda texts, ctx: [1.0 if t == "good" else 0.3 for t in texts]  # noqa: E731
    pairs = synthetic_preferences(["p"] * n, [["good", "bad"]] * n, reward, tau, torch.Generator().manual_seed(0))
    wins = sum(p.chosen == "good" for p in pairs)
    prob = 1 / (1 + math.exp(-(1.0 - 0.3) / tau))
    assert abs(wins - n * prob) <= 4 * math.sqrt(n * prob * (1 - prob))
    with pytest.raises(ValueError, match="expected one finite number each"):
        synthetic_preferences(["p"], [["a", "b"]], lambda t, c: [float("nan"), 0.0])


def test_synthetic_preferences_drop_pairs_closer_than_min_gap():
    """Hidden rewards 0, 0.05, 0.3 for the texts "x<i>": with min_gap 0.1 exactly the pairs whose gap is
    at least 0.1 remain; a negative gap is refused."""
    value = {"x0": 0.0, "x1": 0.05, "x2": 0.3}
    reward = lambda texts, ctx: [value[t] for t in texts]  # noqa: E731
    groups = [["x0", "x1"], ["x0", "x2"], ["x1", "x2"], ["x2", "x2"]]
    pairs = synthetic_preferences(["p"] * 4, groups, reward, 0.1, torch.Generator().manual_seed(0), min_gap=0.1)
    assert sorted(tuple(sorted((p.chosen, p.rejected))) for p in pairs) == [("x0", "x2"), ("x1", "x2")]
    assert len(synthetic_preferences(["p"] * 4, groups, reward, 0.1, torch.Generator().manual_seed(0))) == 3
    with pytest.raises(ValueError, match="min_gap must be >= 0, got -0.1"):
        synthetic_preferences(["p"], [["x0", "x1"]], reward, 0.1, min_gap=-0.1)


def _minimise(nll, k: int) -> torch.Tensor:
    """argmin of a smooth convex function of k float64 parameters (LBFGS from 0, strong Wolfe)."""
    free = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([free], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(free)
        loss.backward()
        return loss

    opt.step(closure)
    return free.detach()


def test_bradley_terry_mle_recovers_the_reward_up_to_a_constant():
    """K items, true reward r. Population (exact comparison probabilities, every ordered pair): the MLE is
    r + const to 1e-8. Sampled (30,000 comparisons, fitted with bradley_terry_loss): within 4 standard errors
    from the inverse Hessian."""
    g = torch.Generator().manual_seed(0)
    K = 5
    r = torch.randn(K, generator=g, dtype=torch.float64)
    i, j = torch.triu_indices(K, K, 1)
    p = torch.sigmoid(r[i] - r[j])

    def population_nll(free):  # reward of item 0 fixed at 0 (the constant is not identified)
        rr = torch.cat([free.new_zeros(1), free])
        return (p * -torch.nn.functional.logsigmoid(rr[i] - rr[j])  # the Bradley–Terry likelihood's expectation
                + (1 - p) * -torch.nn.functional.logsigmoid(rr[j] - rr[i])).sum()

    assert torch.allclose(_minimise(population_nll, K - 1), (r - r[0])[1:], atol=1e-8)

    n = 30_000
    a, b = torch.randint(K, (n,), generator=g), torch.randint(K - 1, (n,), generator=g)
    b = b + (b >= a).long()  # b ≠ a
    a_wins = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(r[a] - r[b])
    w, l_ = torch.where(a_wins, a, b), torch.where(a_wins, b, a)

    def sample_nll(free):
        rr = torch.cat([free.new_zeros(1), free])
        return bradley_terry_loss(rr[w], rr[l_]) * n

    est = _minimise(sample_nll, K - 1)
    cov = torch.linalg.inv(torch.autograd.functional.hessian(sample_nll, est))
    se = cov.diagonal().sqrt()
    assert bool(((est - (r - r[0])[1:]).abs() <= 4 * se).all()), (est, (r - r[0])[1:], se)
    assert float(se.max()) < 0.05  # enough comparisons for the check to mean something
