"""Failures that must lose nothing and say what happened (issue 12's findings, one test each or more):
seeds, resume advice, corrupt checkpoints, interrupts, output_dir, non-finite gradients, early
validation, empty contexts, probability range, unreachable targets, noisy estimates, p = a."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

import fdiv_align
from fdiv_align.training.checkpoint import CorruptCheckpointsError, list_checkpoints
from fdiv_align.lm.models import tiny_model
from fdiv_align.report import NOISE_NOTE, tables
from fdiv_align.targets import BooleanScorer, ProbabilityScorer, RewardScorer, Task
from fdiv_align.targets.scorers import ScorerError
from fdiv_align.training.trainer import progress_postfix
from fdiv_align.training.trainer import NonFiniteGradientError, Trainer

HERE = Path(__file__).parent
SMOKE = ["model=tiny", "trainer=smoke", "task=amazing", "logger.progress=false", "model.device=cpu", "trainer.compile=false"]


def _cli(args, cwd, delay="", **popen):
    env = {**os.environ, "FDIV_TEST_DELAY": delay, "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, str(HERE / "cli_with_delays.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(proc, marker: str, timeout: float = 120) -> str:
    """Read stderr until a line contains ``marker``; returns what was read."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)}")


def _finish(proc, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not exit within {timeout} s of the signal") from None
    return proc.returncode, err


# ---------------------------------------------------------------- 4. same seed, same run
def test_random_state_consumed_while_loading_does_not_change_the_run(tmp_path, monkeypatch):
    """A first run materialises the model (random init before the weights load): the LoRA init must not
    depend on it."""
    cfg = tiny_cfg(model={"lora": True, "lora_r": 4})
    inits = []
    for consumed in (0, 1000):
        def load(self, consumed=consumed):
            torch.randn(consumed)  # what a materialisation draws
            return tiny_model(seed=3)

        monkeypatch.setattr(Trainer, "_load_model", load)
        tr = Trainer(cfg, output_dir=tmp_path / str(consumed))
        inits.append({n: p.detach().clone() for n, p in tr.policy.trainable.items()})
    assert all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0])


# ---------------------------------------------------------------- 5, 7, 8: the CLI and signals
def test_interrupt_in_sampling_stops_at_once_and_the_advice_resumes(tmp_path):
    """Ctrl-C during a long sampling phase: the process leaves within seconds (not at the end of the
    step), checkpoints the last completed step, and prints a command that resumes this run — also for a
    default (timestamped) run directory."""
    proc = _cli(SMOKE, tmp_path, delay="sample:60")
    _wait_for(proc, "READY sample step 2")  # steps 1, 2 done (checkpoint at 2), sampling of step 3 running
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    rc, err = _finish(proc, timeout=20)
    assert time.time() - t0 < 20 and rc in (-signal.SIGINT, 128 + signal.SIGINT), (rc, err)
    assert "sampling and scoring of step 3 abandoned" in err
    command = err.split("To resume, run:\n", 1)[1].splitlines()[0].strip()
    run_dir = Path(command.split("output_dir=", 1)[1])
    assert [c.name for c in list_checkpoints(tmp_path / run_dir / "checkpoints")][-1] == "checkpoint-00000002"
    args = command.split()[1:]
    assert args[:len(SMOKE)] == SMOKE
    resumed = subprocess.run([sys.executable, str(HERE / "cli_with_delays.py"), *args], cwd=tmp_path, text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "(step 2 of 4)" in resumed.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # each step once: the abandoned step 3 left no trace


def test_second_interrupt_forces_exit_during_an_update(tmp_path):
    proc = _cli([*SMOKE, f"output_dir={tmp_path / 'run'}"], tmp_path, delay="update:60")
    _wait_for(proc, "READY update step 1")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, "stopping at the end of this step")
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    rc, err = _finish(proc, timeout=20)
    assert time.time() - t0 < 20 and rc == 128 + signal.SIGINT, (rc, err)
    assert "second SIGINT: stopping now" in err


def test_sigterm_while_loading_says_so_and_leaves_no_directory(tmp_path):
    proc = _cli(SMOKE, tmp_path, delay="load:60")
    _wait_for(proc, "READY load")
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc, timeout=20)
    assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), (rc, err)
    assert "interrupted by SIGTERM during model loading: no step was taken, nothing to save" in err
    assert not list((tmp_path / "outputs").rglob("*.yaml"))  # no stray run directory


def test_output_dir_is_the_run_directory_and_failures_leave_nothing(tmp_path):
    out = tmp_path / "my_run"
    ok = subprocess.run([sys.executable, "-m", "fdiv_align", *SMOKE, f"output_dir={out}"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (out / ".hydra" / "config.yaml").exists() and (out / "summary.json").exists()
    assert not (tmp_path / "outputs").exists()  # no stray Hydra directory
    table = tables([fdiv_align.report.load_run(out)])
    assert "? samples" not in table and "lr 0.01" in table and "baseline loo" in table
    bad = subprocess.run([sys.executable, "-m", "fdiv_align", *SMOKE, "trainer.lr=-1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "trainer.lr must be a finite number > 0, got -1" in bad.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("config.yaml"))


# ---------------------------------------------------------------- 6. every checkpoint corrupt
def test_all_checkpoints_corrupt_refuses_then_resume_false_sets_them_aside(tmp_path):
    cfg = tiny_cfg(trainer={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2})
    Trainer(cfg, lm=tiny_model(seed=1), output_dir=tmp_path).train()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]
    for c in ckpts:  # truncate every state file
        state = c / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (tmp_path / "summary.json").unlink()  # an unfinished run
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CorruptCheckpointsError, match="every checkpoint in .* is incomplete or corrupt"):
        Trainer(cfg, lm=tiny_model(seed=1), output_dir=tmp_path).train()
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == [c.name for c in ckpts]  # nothing deleted
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    fresh = tiny_cfg(trainer={"steps": 4, "checkpoint_every": 2, "resume": False})
    assert Trainer(fresh, lm=tiny_model(seed=1), output_dir=tmp_path).train()["status"] == "finished"
    aside = list(tmp_path.glob("superseded-*"))
    assert len(aside) == 1 and len(list_checkpoints(aside[0] / "checkpoints")) == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # no step logged twice
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002", "checkpoint-00000004"]


# ---------------------------------------------------------------- 9. chi2 blows up
def test_non_finite_gradient_stops_the_step_naming_the_cause(tmp_path):
    """`fdiv-align model=tiny trainer=smoke task=amazing divergence=chi2`: coefficients ~1e32 by step 2."""
    from fdiv_align.config import from_dict

    cfg = from_dict({"model": {"name": "tiny", "lora": False, "device": "cpu"},
                     "divergence": {"name": "chi2", "log_phi_floor": -10.0}, "task": {"name": "amazing"},
                     "trainer": {"steps": 4, "samples_per_step": 8, "micro_batch_size": 8, "lr": 1e-2, "eval_every": 2,
                                 "eval_samples": 8, "checkpoint_every": 2, "precision": "fp32"},
                     "logger": {"progress": False}})
    tr = Trainer(cfg, output_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in tr.policy.trainable.items()}
    snapshots = []
    tr.callbacks.append(lambda t, step, rec: snapshots.append({n: p.detach().clone() for n, p in t.policy.trainable.items()}))
    with pytest.raises(NonFiniteGradientError, match=r"step \d+: the gradient norm is (inf|nan) with divergence 'chi2'.*heavy-tailed"):
        tr.train()
    last = snapshots[-1] if snapshots else before
    assert all(torch.equal(p.detach(), last[n]) for n, p in tr.policy.trainable.items())  # not updated
    assert all(torch.isfinite(p).all() for p in tr.policy.trainable.values())


# ---------------------------------------------------------------- 10. smaller findings
def test_trainer_is_exported():
    assert fdiv_align.Trainer is Trainer and "Trainer" in fdiv_align.__all__


@pytest.mark.parametrize("key,value,message", [
    ("lr", -1.0, "trainer.lr must be a finite number > 0, got -1.0"),
    ("temperature", 0.0, "trainer.temperature must be a finite number > 0, got 0.0"),
    ("top_p", 1.5, "trainer.top_p must be in (0, 1]"),
    ("precision", "half", "trainer.precision must be one of auto, fp32, bf16, got 'half'"),
])
def test_bad_values_fail_before_the_model_loads(tmp_path, monkeypatch, key, value, message):
    monkeypatch.setattr(Trainer, "_load_model", lambda self: pytest.fail("the model was loaded first"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Trainer(tiny_cfg(trainer={key: value}), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_task_parameter_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_load_model", lambda self: pytest.fail("the model was loaded first"))
    with pytest.raises(ValueError, match=r"task 'amazing' does not accept parameters \{'beta': 0.5\}"):
        Trainer(tiny_cfg(task={"params": {"beta": 0.5}}), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_empty_context_list_names_the_contexts(tmp_path):
    task = Task("no_contexts", BooleanScorer(lambda t, c: True, name="yes"), contexts=[])
    with pytest.raises(ValueError, match="task 'no_contexts' has an empty context list"):
        Trainer(tiny_cfg(), lm=tiny_model(seed=0), task=task, output_dir=tmp_path)


def test_probability_scorer_rejects_values_above_one():
    with pytest.raises(ScorerError, match=r"returned 5.0 \(expected a probability in \[0, 1\]\)"):
        ProbabilityScorer(lambda t, c: [0.5, 5.0]).log_scores(["a", "b"])
    assert torch.equal(ProbabilityScorer(lambda t, c: [0.0, 1.0]).log_scores(["a", "b"]),
                       torch.tensor([float("-inf"), 0.0], dtype=torch.float64))


def test_unreachable_target_is_reported_not_nan(tmp_path, capsys):
    task = Task("never", BooleanScorer(lambda t, c: False, name="never"))
    summary = Trainer(tiny_cfg(trainer={"steps": 2}), lm=tiny_model(seed=0), task=task, output_dir=tmp_path).train()
    assert any("no sample in 16 had P > 0" in w for w in summary["warnings"])
    assert "warning: no sample in 16 had P > 0" in capsys.readouterr().err
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["status"] == "finished"


def test_noisy_estimates_are_shown_as_such(tmp_path):
    bar = progress_postfix({"alignment": 0.5, "kl_pi_a": -0.02, "kl_pi_a_se": 0.05, "samples_per_second": 3.0})
    assert bar["kl_pi_a"] == "-0.02±0.05"
    run = {"summary": {"task": "t", "divergence": "js", "seed": 0, "steps": 1, "lora": False,
                       "base": {"kl_pi_a": 0.0, "alignment": 0.1}, "final": {"kl_pi_a": -0.02, "alignment": 0.3}},
           "config": {"trainer": {"samples_per_step": 8, "lr": 0.01, "baseline": "loo"}}}
    table = tables([run])
    assert "-0.020 ⁻" in table and NOISE_NOTE in table


def test_constant_reward_leaves_the_policy_at_the_base(tmp_path):
    """p = a (a constant reward): the f-DPG gradient is exactly 0; the ~1e-6 disagreement of sampled and
    rescored log-probs must not be turned into full Adam steps (KL(π‖a) was 28.9 after 4 steps)."""
    task = Task("constant", RewardScorer(lambda t, c: [0.0] * len(t), beta=1.0, name="zero"))
    cfg = tiny_cfg(trainer={"steps": 4, "eval_every": 0}, model={"lora": False})
    tr = Trainer(cfg, lm=tiny_model(seed=0), task=task, output_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in tr.policy.trainable.items()}
    summary = tr.train()
    assert abs(summary["final"]["kl_pi_a"]) < 1e-4
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.policy.trainable.items())
    off = tiny_cfg(trainer={"steps": 4, "eval_every": 0, "logratio_resolution": 0.0}, model={"lora": False})
    drifted = Trainer(off, lm=tiny_model(seed=0), task=task, output_dir=tmp_path / "off").train()
    assert drifted["final"]["kl_pi_a"] > 1.0  # the safeguard is what prevents it


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_other_damage_is_named(tmp_path, capfd):
    """What a crash or a full disk leaves at the end of metrics.jsonl (a line without its end) does not block
    the resume: it is dropped, with a message; a damaged line elsewhere, or a garbled summary.json, is an
    error naming the file (and the line)."""
    import json

    from conftest import tiny_cfg

    from fdiv_align.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(tiny_cfg(trainer={"steps": 4, "checkpoint_every": 2, "eval_every": 0}), output_dir=run).fit()
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "kind": "tra')
    capfd.readouterr()
    summary = Trainer(tiny_cfg(trainer={"steps": 6, "checkpoint_every": 2, "eval_every": 0}), output_dir=run).fit()
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert "dropping a torn last line" in capfd.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ['{"garbled'] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        Trainer(tiny_cfg(trainer={"steps": 8, "checkpoint_every": 2, "eval_every": 0}), output_dir=run).fit()
    (run / "summary.json").write_text('{"status": "fini')
    with pytest.raises(ValueError, match=r"summary.json is not valid JSON"):
        Trainer(tiny_cfg(trainer={"steps": 8, "checkpoint_every": 2, "eval_every": 0}), output_dir=run).fit()


# ---------------------------------------------------------------- 9. the printed resume command pastes
@pytest.mark.parametrize("name", ["plain", "my run", "é→∑ dir", "it's", "back\\slash", "q\\'uote", "a=b,c", "trail\\"])
def test_the_printed_resume_command_works_when_pasted(tmp_path, name):
    """Issue 26, finding 9: the command printed on a stop is split by the shell into the program, the run's
    overrides (one argument each, a quoted one included) and output_dir, whose value Hydra reads back as the
    run directory, whatever its name holds."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fdiv_align.cli import resume_command

    out = str(tmp_path / name)
    overrides = ["model=tiny", "task.contexts='my prompts.txt'", f"output_dir={tmp_path}/old"]
    words = shlex.split(resume_command("fdiv-align", overrides, out))
    assert words[:3] == ["fdiv-align", "model=tiny", "task.contexts='my prompts.txt'"] and len(words) == 4
    parser = OverridesParser.create()
    assert parser.parse_override(words[3]).key_or_group == "output_dir"
    assert parser.parse_override(words[3]).value() == out
    assert parser.parse_override(words[2]).value() == "my prompts.txt"
