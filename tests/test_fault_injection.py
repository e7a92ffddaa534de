"""The findings of the fault-injection probe (issue 26), one test each: a finished run is never relabelled,
loading a file runs no code from it, a stop is honoured inside torch.compile, one run per directory, damaged or
missing records, changed settings on resume, pair training's stop signals and context window, and a crash while
a checkpoint is replaced. The contract they check is docs/design.md, "Run safety"."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from fdiv_align.config import ModelConfig, PairTrainingConfig, RewardModelConfig
from fdiv_align.files import UnsafeCheckpointError
from fdiv_align.preferences import PreferencePair, write_preferences
from fdiv_align.preferences.pair_training import run_reward_model
from fdiv_align.targets.reward_model import load_reward_model
from fdiv_align.training import checkpoint as ck
from fdiv_align.training.config_changes import ConfigChangedError
from fdiv_align.training.run_dir import RunDir, RunDirLockedError
from fdiv_align.training.trainer import Trainer

HERE = Path(__file__).parent
SMOKE = ["model=tiny", "trainer=smoke", "logger.progress=false"]
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}


class _RunsCode:
    """A pickle that, when loaded without restriction, creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- 1. a finished run is not relabelled
def test_1_a_finished_run_rerun_with_another_config_is_refused_and_keeps_its_records(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "fdiv_align", *SMOKE, f"output_dir={out}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl", ".hydra/config.yaml")}
    other = subprocess.run([sys.executable, "-m", "fdiv_align", *SMOKE, "divergence=rkl", "trainer.steps=8",
                            f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0, other.stderr
    assert "divergence.name: 'js' -> 'rkl'" in other.stderr and "KL" not in other.stdout
    assert {name: (out / name).read_bytes() for name in before} == before  # .hydra/ still says js
    assert not list(out.glob(".hydra-pending*"))


# ---------------------------------------------------------------- 2. loading a file runs no code
def test_2_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(trainer={"steps": 2}), output_dir=run).fit()
    path = ck.list_checkpoints(run / "checkpoints")[-1]
    marker = tmp_path / "ran"
    state = ck.read_checkpoint(path)
    state["train_state"]["base_eval"] = _RunsCode(marker)
    torch.save(state, path / ck.STATE_FILE)
    (path / ck.MANIFEST).unlink()
    ck._write_manifest(path, 2)  # recomputed: the manifest only detects damage, not intent
    with pytest.raises(UnsafeCheckpointError, match="state.pt asks to run or construct .*system"):
        Trainer(tiny_cfg(trainer={"steps": 4}), output_dir=run).fit()
    assert not marker.exists()


def test_2_a_reward_model_file_whose_pickle_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": "fdiv_align.reward_model/1", "evil": _RunsCode(marker)}, tmp_path / "reward_model.pt")
    with pytest.raises(UnsafeCheckpointError, match="reward_model.pt asks to run"):
        load_reward_model(tmp_path)
    assert not marker.exists()


def test_2_dcp_metadata_whose_pickle_runs_code_is_refused_and_real_metadata_loads(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = {"trainable": {"w": torch.arange(6.0).reshape(3, 2)}, "optimizer": {"w": {"step": torch.tensor(3.0)}}}
    with pytest.warns(UserWarning):  # DCP: "assuming the intent is to save in a single process"
        dcp.save(saved, checkpoint_id=tmp_path / ck.SHARDED)
    template = {"trainable": {"w": torch.zeros(3, 2)}, "optimizer": {"w": {"step": torch.zeros(())}}}
    with pytest.warns(UserWarning):
        ck.load_sharded(tmp_path, template)
    assert torch.equal(template["trainable"]["w"], saved["trainable"]["w"]) and float(template["optimizer"]["w"]["step"]) == 3
    marker = tmp_path / "ran"
    (tmp_path / ck.SHARDED / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match="asks for posix.system, which is not checkpoint metadata"):
        ck.load_sharded(tmp_path, template)
    assert not marker.exists()


def test_2_no_unrestricted_load_is_left_in_the_package():
    package = HERE.parent / "fdiv_align"
    hits = [f"{p}:{n}" for p in package.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
            if "weights_only=False" in line or "pickle.load(" in line]
    assert not hits, hits


# ---------------------------------------------------------------- 3. a stop inside torch.compile
def test_3_a_stop_while_torch_compile_traces_saves_the_last_step(tmp_path, monkeypatch):
    """SIGTERM arrives while dynamo compiles code in step 2's sampling: the stop is honoured as anywhere else
    (the sampling abandoned, step 1 checkpointed), not wrapped by dynamo into a crash."""
    def signalling_backend(gm, inputs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises inside dynamo's call of the backend
        return gm.forward

    sample = Trainer._sample

    def sample_compiling(self, *args, **kwargs):
        if self.step == 1 and kwargs.get("proposal", True):
            torch._dynamo.reset()
            torch.compile(lambda x: x.sin() + 1, backend=signalling_backend)(torch.ones(3))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_sample", sample_compiling)
    result = Trainer(tiny_cfg(trainer={"steps": 4, "checkpoint_every": 0}), output_dir=tmp_path).fit()
    assert result == {"status": "interrupted", "step": 1, "signal": signal.SIGTERM, "saved": True}
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000001"]


# ---------------------------------------------------------------- 4. one run per directory
def test_4_a_second_run_on_a_live_run_directory_is_refused_and_a_dead_holder_does_not_block(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fdiv_align.training.run_dir import RunDir; "
                               f"RunDir({str(run)!r}); print('READY', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "READY"

        def no_loading(self):
            raise AssertionError("the model was loaded although the directory is held")

        monkeypatch.setattr(Trainer, "_load_model", no_loading)
        with pytest.raises(RunDirLockedError, match=rf'in use by another run \({{"pid": {holder.pid}, "host": '):
            Trainer(tiny_cfg(), output_dir=run)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # the dead holder's lock file is still there
    assert Trainer(tiny_cfg(trainer={"steps": 2}), output_dir=run).fit()["status"] == "finished"


# ---------------------------------------------------------------- 5. missing records
def test_5_missing_records_are_said_and_the_final_evaluation_is_logged_once(tmp_path, capfd):
    run = tmp_path / "run"
    Trainer(tiny_cfg(trainer={"steps": 2}), output_dir=run).fit()
    (run / "summary.json").unlink()  # a crash after the final checkpoint, before the summary
    summary = Trainer(tiny_cfg(trainer={"steps": 2}), output_dir=run).fit()
    finals = [r for r in _records(run) if r["kind"] == "eval" and r["step"] == 2]
    assert len(finals) == 1
    assert [summary["final"][k] for k in ("alignment", "kl_pi_a")] == [finals[0][k] for k in ("alignment", "kl_pi_a")]
    (run / "metrics.jsonl").unlink()
    capfd.readouterr()
    Trainer(tiny_cfg(trainer={"steps": 3}), output_dir=run).fit()
    assert "metrics.jsonl is missing: the records of steps 1..2 are lost" in capfd.readouterr().err
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == [3]


# ---------------------------------------------------------------- 6. changed settings on resume
def test_6_a_changed_setting_on_resume_is_refused_or_applied_and_recorded_as_run(tmp_path, capfd):
    run = tmp_path / "run"
    Trainer(tiny_cfg(trainer={"steps": 2}), output_dir=run).fit()
    with pytest.raises(ConfigChangedError, match=r"trainer.lr: 0.01 -> 0.05; trainer.samples_per_step: 8 -> 16"):
        Trainer(tiny_cfg(trainer={"steps": 4, "lr": 0.05, "samples_per_step": 16}), output_dir=run).fit()
    capfd.readouterr()
    summary = Trainer(tiny_cfg(trainer={"steps": 4, "micro_batch_size": 4}), output_dir=run).fit()
    err = capfd.readouterr().err
    assert "resuming with a changed setting: trainer.micro_batch_size: 8 -> 4" in err
    assert "resuming with a changed setting: trainer.steps: 2 -> 4" in err
    assert summary["config"]["trainer"]["micro_batch_size"] == 4 and summary["config"]["trainer"]["lr"] == 0.01


# ---------------------------------------------------------------- 7. pair training: a signal while loading
def test_7_a_stop_signal_while_a_pair_trainer_loads_its_model_ends_it_cleanly(tmp_path):
    write_preferences([PreferencePair("the", "good", "bad"), PreferencePair("the", "a good", "a bad")],
                      tmp_path / "p.jsonl")
    script = f"""
import json, os, signal, time
from fdiv_align.config import ModelConfig, PairTrainingConfig, RewardModelConfig
from fdiv_align.lm import models
from fdiv_align.preferences.pair_training import run_reward_model
def loading(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
models.load_configured = loading
cfg = RewardModelConfig(model=ModelConfig(name="tiny"), training=PairTrainingConfig(data={str(tmp_path / 'p.jsonl')!r}, eval_fraction=0.5))
print(json.dumps(run_reward_model(cfg, {str(tmp_path / 'run')!r})))
"""
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert time.time() - t0 < 25  # not the 30 s of loading
    assert json.loads(done.stdout) == {"status": "interrupted", "step": 0, "signal": signal.SIGTERM, "saved": False}
    assert "SIGTERM: stopping (model loading abandoned)" in done.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 8. a crash while a checkpoint is replaced
def test_8_a_crash_while_a_checkpoint_is_re_saved_keeps_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    old = ck.save_checkpoint(run / "checkpoints", 2, {"which": "old"})
    real_replace, calls = os.replace, []

    def crash_on_the_second_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old aside done; the new one not yet in place
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError, match="killed"):
        ck.save_checkpoint(run / "checkpoints", 2, {"which": "new"})
    monkeypatch.undo()
    assert calls[0][0] == old.name and calls[1][1] == old.name
    RunDir(run).close()  # the next start
    assert ck.load_latest(run / "checkpoints")[1] == {"which": "old"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == [old.name]  # no temporary left


# ---------------------------------------------------------------- 10. pair training's context window
def test_10_a_pair_longer_than_the_context_window_is_refused_naming_it(tmp_path):
    long = " ".join(["good"] * 5000)
    prefs = write_preferences([PreferencePair("the", "good", "bad"), PreferencePair("the", long, "bad"),
                               PreferencePair("a", "bad good", "good bad")], tmp_path / "p.jsonl")
    cfg = RewardModelConfig(model=ModelConfig(name="tiny", lora=False),
                            training=PairTrainingConfig(data=str(prefs), threads=1, progress=False))
    with pytest.raises(ValueError, match=r"pair 2 of .*p.jsonl \(prompt 'the'\) is 5003 tokens long .* more than the "
                                         r"model's 128 positions"):
        run_reward_model(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 11. the smaller ones
def test_11_binary_or_broken_contexts_and_preference_files_are_named_with_their_line(tmp_path):
    from fdiv_align.preferences import PreferenceDataError, load_preferences
    from fdiv_align.targets import load_contexts

    (tmp_path / "c.txt").write_bytes(b"a dog\n\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"c.txt:2: not UTF-8 text \(byte 0x89 at column 1\)"):
        load_contexts(str(tmp_path / "c.txt"))
    (tmp_path / "c.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        load_contexts(str(tmp_path / "c.jsonl"))
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\xff\xfe\x00\n')
    with pytest.raises(PreferenceDataError, match=r"p.jsonl:2: not UTF-8 text"):
        load_preferences(tmp_path / "p.jsonl")


def test_11_a_full_disk_is_reported_as_such_and_leaves_no_temporary(tmp_path, monkeypatch):
    import shutil

    from fdiv_align import files

    def torn_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")

    monkeypatch.setattr(torch, "save", torn_write)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=r"no space left on the device of .*checkpoints while writing checkpoint-00000002 "
                                      r"\(RuntimeError: .*unexpected pos"):
        ck.save_checkpoint(tmp_path / "checkpoints", 2, {"a": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_11_a_fresh_start_names_its_actual_reason(tmp_path, capfd):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')  # a run that died before its checkpoint
    Trainer(tiny_cfg(trainer={"steps": 1}), output_dir=tmp_path).fit()
    err = capfd.readouterr().err
    assert "starting over (no checkpoint to resume from)" in err and "trainer.resume=false" not in err


def test_11_sigterm_during_the_final_evaluation_abandons_it_and_resume_logs_it_once(tmp_path, monkeypatch):
    evaluate = Trainer.evaluate

    def signalled(self):
        if self.step == 2 and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", signalled)
    stopped = Trainer(tiny_cfg(trainer={"steps": 2, "eval_every": 0}), output_dir=tmp_path).fit()
    assert stopped == {"status": "interrupted", "step": 2, "signal": signal.SIGTERM, "saved": True}
    assert not (tmp_path / "summary.json").exists() and not [r for r in _records(tmp_path) if r["step"] == 2 and r["kind"] == "eval"]
    monkeypatch.undo()
    summary = Trainer(tiny_cfg(trainer={"steps": 2, "eval_every": 0}), output_dir=tmp_path).fit()
    assert summary["status"] == "finished"
    assert len([r for r in _records(tmp_path) if r["step"] == 2 and r["kind"] == "eval"]) == 1


def test_11_a_policy_that_samples_one_text_per_context_is_reported_as_collapsed(tmp_path, capfd):
    greedy = Trainer(tiny_cfg(trainer={"steps": 1, "top_k": 1, "fused_logprobs": False}), output_dir=tmp_path / "greedy").fit()
    assert "step 1: the 8 samples were one text per context" in capfd.readouterr().err
    assert any("collapsed" in w for w in greedy["warnings"])
    assert _records(tmp_path / "greedy")[1]["distinct_samples"] == 1
    plain = Trainer(tiny_cfg(trainer={"steps": 1}), output_dir=tmp_path / "plain").fit()
    assert not any("collapsed" in w for w in plain["warnings"]) and "collapsed" not in capfd.readouterr().err


def test_11_the_report_refuses_two_runs_of_one_seed_and_flags_a_degenerate_target_row(tmp_path):
    from fdiv_align.report import tables, target_row

    final = {"alignment": 1.0, "kl_pi_a": 1.0, "target_kl_a": 0.0, "target_entropy": 0.0, "qrs_proposed": 8,
             "qrs_accepted": 8, "qrs_tv_bound": 0.0, "qrs_samples": {"texts": [""] * 8, "contexts": [""] * 8,
                                                                      "alignment": [1.0] * 8}}
    runs = [{"dir": tmp_path / name, "summary": {"task": "t", "divergence": "js", "steps": 4, "seed": 0, "final": final,
                                                  "config": {"divergence": {"log_phi_floor": None}}}, "evals": [],
             "config": {}} for name in ("a", "copy_of_a")]
    with pytest.raises(ValueError, match=r"t/js: runs .*a and .*copy_of_a both have seed 0"):
        tables(runs)
    described = target_row(runs[:1])["description"]
    assert "NOT MEANINGFUL: 8 accepted sample(s), 1 distinct text(s)" in described and "TV(p, p_β) ≤" not in described
