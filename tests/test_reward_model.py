"""Reward models and offline f-DPO on preference pairs (fdiv_align/targets/reward_model.py, pair_training.py).

A tiny Llama (built in code) learns a known preference — responses with more "good" than "bad" words
win, Bradley–Terry labels at temperature 0.25 — and must beat chance on held-out pairs by more than 3
binomial standard errors; the saved reward model reloads to the same rewards and serves the
``reward_model`` task; resuming from a checkpoint gives the run without interruption; bad inputs fail
clearly and leave nothing half-written.
"""

import json
import os
import signal

import pytest
import torch

from fdiv_align.config import ModelConfig, PairTrainingConfig, PreferenceOptConfig, RewardModelConfig
from fdiv_align.lm.models import TINY_WORDS, tiny_model
from fdiv_align.preferences.pair_training import run_preference_opt, run_reward_model, split_pairs
from fdiv_align.preferences import load_preferences, synthetic_preferences, write_preferences
from fdiv_align.targets.reward_model import RewardModel, RewardModelError, load_reward_model, save_reward_model
from fdiv_align.targets.tasks import get_task
from fdiv_align.training.trainer import Trainer
from conftest import tiny_cfg

WORDS = [w for w in TINY_WORDS if w not in ("(", ")", ":", ",", ".")]


def _reward(texts, contexts):
    return [t.split().count("good") - t.split().count("bad") for t in texts]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    vocab = WORDS + ["good", "bad"] * 6  # the two words that matter, frequent enough
    responses = [[" ".join(vocab[i] for i in torch.randint(len(vocab), (4,), generator=g).tolist()) for _ in range(2)]
                 for _ in range(300)]
    pairs = synthetic_preferences(["the"] * len(responses), responses, _reward, temperature=0.25, generator=g)
    return write_preferences(pairs, tmp_path_factory.mktemp("prefs") / "prefs.jsonl")


def _training(data, **kw):
    return PairTrainingConfig(data=str(data), epochs=kw.pop("epochs", 3), batch_size=16, lr=kw.pop("lr", 3e-3),
                              checkpoint_every=kw.pop("checkpoint_every", 0), threads=1, progress=False, **kw)


def _rm_cfg(data, **kw):
    return RewardModelConfig(model=ModelConfig(name="tiny", lora=False), training=_training(data, **kw))


def test_reward_model_learns_a_known_preference_and_serves_the_reward_model_task(prefs, tmp_path):
    summary = run_reward_model(_rm_cfg(prefs), tmp_path / "rm")
    final = summary["final"]
    assert summary["initial"]["heldout_accuracy"] == 0.5  # the zero head ties every pair
    assert final["heldout_accuracy"] - 0.5 > 3 * final["heldout_accuracy_se"], final
    rm = load_reward_model(tmp_path / "rm")
    _, heldout = split_pairs(load_preferences(prefs), 0.2, 0)
    diffs = rm.rewards([p.chosen for p in heldout], [p.prompt for p in heldout]) - \
        rm.rewards([p.rejected for p in heldout], [p.prompt for p in heldout])
    acc = float(((diffs > 0).double() + 0.5 * (diffs == 0).double()).mean())
    assert acc == final["heldout_accuracy"]  # the saved file is the trained model
    # the learned reward orders texts as the true one does: more "good" scores higher
    r = rm.rewards(["good good good good", "bad bad bad bad"], ["the", "the"])
    assert r[0] > r[1]
    task = get_task("reward_model", path=str(tmp_path / "rm"), beta=0.5)
    texts = ["good cat", "bad dog"]
    assert torch.allclose(task.scorer.log_scores(texts, ["", ""]), rm.rewards(texts, ["", ""]) / 0.5, rtol=1e-12, atol=0)
    # f-DPG on that task, configured as the CLI does: its evaluation's alignment is the reward model's mean r
    cfg = tiny_cfg(task={"name": "reward_model", "params": {"path": str(tmp_path / "rm"), "beta": 0.5}},
                   divergence={"name": "js"}, trainer={"steps": 2, "eval_every": 0, "checkpoint_every": 0})
    trainer = Trainer(cfg, output_dir=tmp_path / "fdpg")
    summary = trainer.train()
    rec, samples = trainer.evaluate()
    expected = rm.rewards(samples["texts"], samples["contexts"])
    assert summary["final"]["alignment"] == pytest.approx(float(expected.mean()), rel=1e-9)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(prefs, tmp_path):
    """Also: the held-out evaluation's batching (eval_batch_size) does not change its figures, and
    eval_at_start=false skips only the step-0 evaluation."""
    straight = run_reward_model(_rm_cfg(prefs, epochs=2, eval_batch_size=7, eval_at_start=False), tmp_path / "a")
    assert straight["initial"] is None
    assert [json.loads(l)["step"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in l] == [straight["steps"] // 2, straight["steps"]]
    run_reward_model(_rm_cfg(prefs, epochs=1, checkpoint_every=3), tmp_path / "b")  # stops after epoch 1
    resumed = run_reward_model(_rm_cfg(prefs, epochs=2, checkpoint_every=3), tmp_path / "b")
    assert resumed["initial"]["heldout_accuracy"] == 0.5
    assert resumed["final"]["heldout_accuracy"] == straight["final"]["heldout_accuracy"]
    # other eval batches pad rows differently: the same fp32 forward up to reduction order (ulps of 6e-8,
    # grown through the tiny model's layers), far below any change a training step makes
    assert resumed["final"]["heldout_loss"] == pytest.approx(straight["final"]["heldout_loss"], rel=1e-5)
    a, b = (torch.load(p / "reward_model.pt", weights_only=False)
            for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a["body"][k], b["body"][k]) for k in a["body"]) and torch.equal(a["head"]["weight"], b["head"]["weight"])
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert steps == sorted(set(steps))  # every step logged once


def test_a_stop_signal_finishes_the_step_saves_and_the_rerun_equals_the_uninterrupted_run(prefs, tmp_path, monkeypatch):
    """SIGTERM during pair training, as in the f-DPG trainer: the step in flight completes, a checkpoint is
    written, the summary says interrupted; rerunning in the same directory gives the uninterrupted run."""
    from fdiv_align.preferences.pair_training import RewardModelObjective

    straight = run_reward_model(_rm_cfg(prefs, epochs=1, eval_at_start=False), tmp_path / "a")
    calls = {"train": 0}
    forward = RewardModelObjective.__call__

    def signal_at_step_3(self, pairs):
        if self.rm.training:
            calls["train"] += 1
            if calls["train"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, pairs)

    monkeypatch.setattr(RewardModelObjective, "__call__", signal_at_step_3)
    stopped = run_reward_model(_rm_cfg(prefs, epochs=1, eval_at_start=False), tmp_path / "b")
    assert stopped["status"] == "interrupted" and stopped["step"] == 3 and stopped["saved"]
    assert stopped["signal"] == signal.SIGTERM and not (tmp_path / "b" / "reward_model.pt").exists()
    monkeypatch.setattr(RewardModelObjective, "__call__", forward)
    resumed = run_reward_model(_rm_cfg(prefs, epochs=1, eval_at_start=False), tmp_path / "b")
    assert resumed["status"] == "finished" and resumed["steps"] == straight["steps"]
    a, b = (torch.load(p / "reward_model.pt", weights_only=False) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a["body"][k], b["body"][k]) for k in a["body"]) and torch.equal(a["head"]["weight"], b["head"]["weight"])


def test_bad_inputs_fail_clearly_and_leave_nothing_half_written(prefs, tmp_path):
    lm = tiny_model()
    lm.tokenizer.pad_token = None
    with pytest.raises(RewardModelError, match="has no pad token"):
        RewardModel(lm.model, lm.tokenizer)
    lm = tiny_model()
    rm = RewardModel(lm.model, lm.tokenizer)
    path = save_reward_model(rm, tmp_path / "nohead", {"name": "tiny", "lora": False})
    state = torch.load(path, weights_only=False)
    del state["head"]["bias"]
    torch.save(state, path)
    with pytest.raises(RewardModelError, match=r"has no reward head \(missing head.bias\)"):
        load_reward_model(path)
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(RewardModelError, match="is not a reward model"):
        load_reward_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no reward model at"):
        load_reward_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="task reward_model needs task.params.path"):
        get_task("reward_model")
    # a run that fails mid-way (the loss blows up) writes no reward model and no summary
    with pytest.raises(FloatingPointError, match="step"):
        run_reward_model(_rm_cfg(prefs, lr=1e30, max_grad_norm=None), tmp_path / "blown")
    assert not (tmp_path / "blown" / "reward_model.pt").exists() and not (tmp_path / "blown" / "summary.json").exists()
    with pytest.raises(ValueError, match="training.eval_fraction must be in"):
        run_reward_model(_rm_cfg(prefs, eval_fraction=1.5), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # checked before anything is written


@pytest.mark.parametrize("divergence", ["rkl", "js"])
def test_offline_f_dpo_learns_the_preference_on_held_out_pairs(prefs, tmp_path, divergence):
    cfg = PreferenceOptConfig(model=ModelConfig(name="tiny", lora=True), training=_training(prefs, lr=2e-2), beta=0.5)
    cfg.divergence.name = divergence
    summary = run_preference_opt(cfg, tmp_path / divergence)
    final = summary["final"]
    assert summary["initial"]["heldout_accuracy"] == 0.5  # π = π_ref: every implicit-reward margin is 0
    assert final["heldout_accuracy"] - 0.5 > 3 * final["heldout_accuracy_se"], final
    assert (tmp_path / divergence / "final_model" / "adapter_config.json").exists()
    cfg.divergence.name = "tv"
    with pytest.raises(ValueError, match=r"f-DPO needs f′\(t\) → −∞ as t → 0; TotalVariation"):
        run_preference_opt(cfg, tmp_path / "tv")


def test_cli_entry_points_train_and_reject_unknown_keys(prefs, tmp_path):
    """``fdiv-align-rm`` (Hydra, fdiv_align/conf/reward_model.yaml) writes the reward model; a misspelt key fails at
    start naming it; ``fdiv-align`` with ``task=reward_model`` and no path says what is missing."""
    import subprocess
    import sys

    def cli(entry, *args):
        return subprocess.run([sys.executable, "-c", f"from fdiv_align.cli import {entry}; {entry}()", *args],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)

    out = cli("rm_main", "model=tiny", f"training.data={prefs}", "training.epochs=1", "training.progress=false",
              "training.threads=1", f"output_dir={tmp_path / 'rm'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out pairwise accuracy 0.500 ->" in out.stdout and (tmp_path / "rm" / "reward_model.pt").exists()
    out = cli("rm_main", "model=tiny", "training.dta=x.jsonl")
    assert out.returncode != 0 and "Key 'dta' not in 'PairTrainingConfig'" in out.stderr
    out = cli("main", "model=tiny", "task=reward_model", "trainer=smoke")
    assert out.returncode != 0 and "task.params.path" in out.stderr


def test_last_token_hidden_is_the_unpadded_rows_last_state():
    """The reward model reads h at the last token of [BOS] + context + continuation (+ EOS); in a batch with
    left-padded prompts and right-padded continuations of different lengths it must equal the state from
    running each row alone, without padding (positions from the attention mask, as in sampling)."""
    from fdiv_align.lm.batch import make_batch
    from fdiv_align.lm.scoring import backbone_and_head, last_token_hidden

    lm = tiny_model(seed=3)
    contexts, texts = ["the cat", "", "she is very happy and"], ["is good", "bad", "he was not sad at all"]
    batch = make_batch(lm.tokenizer, contexts, texts, add_eos=True)
    with torch.no_grad():
        got = last_token_hidden(lm.model, batch, lm.tokenizer.pad_token_id)
        backbone, _ = backbone_and_head(lm.model)
        for i in range(len(texts)):
            ids = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i].bool()], batch.tokens[i][batch.mask[i].bool()]])
            alone = backbone(input_ids=ids[None]).last_hidden_state[0, -1]
            assert torch.allclose(got[i], alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max())), i
