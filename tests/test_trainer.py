"""The trainer: exact toy problems, resume, checkpoints, configs, LoRA, logging, kernel on/off."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from fdiv_align.training.checkpoint import load_latest, save_checkpoint
from fdiv_align.config import from_dict, validate
from fdiv_align.lm.models import tiny_model
from fdiv_align.testing.toy import enumerable_lm, enumeration_batch, exact_trainer_divergences
from fdiv_align.training.trainer import Trainer
from conftest import tiny_cfg, toy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_cfg(div, proposal="on", steps=40):
    return from_dict({"model": {"name": "tiny"}, "divergence": {"name": div}, "task": {"max_new_tokens": 3},
                      "trainer": {"steps": steps, "samples_per_step": 32, "micro_batch_size": 32, "eval_every": 0,
                                  "eval_samples": 8, "checkpoint_every": 0, "lr": 3e-2, "stop_at_eos": False,
                                  "proposal": proposal, "proposal_update_every": 2, "threads": 1, "precision": "fp32"},
                      "logger": {"progress": False, "jsonl": False}})


@pytest.mark.parametrize("div,proposal", [("fkl", "on"), ("rkl", "on"), ("js", "on"), ("tv", "on"), ("js", "off"),
                                          ("fkl", "off")])
def test_trainer_lowers_exact_divergence_on_enumerable_lm(tmp_path, div, proposal, capsys):
    lm, seqs = enumerable_lm()
    tr = Trainer(toy_cfg(div, proposal), lm=lm, task=toy_task(div), output_dir=tmp_path)
    every = enumeration_batch(lm.tokenizer, seqs)
    before = exact_trainer_divergences(tr, every)
    tr.train()
    after = exact_trainer_divergences(tr, every)
    with capsys.disabled():
        print(f"\n[trainer {div}/{proposal}-policy] exact {div}: {before[div]:.4f} -> {after[div]:.4f}"
              + (f" (proposal updates {tr.proposal.updates})" if proposal == "off" else ""))
    assert after[div] <= 0.5 * before[div]
    if proposal == "off":
        assert tr.proposal.updates >= 1


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.trainable.items()}


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    full = Trainer(tiny_cfg(), output_dir=tmp_path / "full")
    full.train()

    def kill_at_3(trainer, step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = Trainer(tiny_cfg(), output_dir=tmp_path / "part", callbacks=[kill_at_3])
    summary = part.train()
    assert summary["status"] == "interrupted" and summary["step"] == 3
    resumed = Trainer(tiny_cfg(), output_dir=tmp_path / "part")
    summary = resumed.train()
    assert summary["status"] == "finished" and summary["steps"] == 6
    a, b = _params(full), _params(resumed)
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert diff <= 1e-6, diff
    # metrics of the resumed run cover each step exactly once
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncated_checkpoint_is_detected(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1000)})
    newest = save_checkpoint(tmp_path, 2, {"x": 2 * torch.ones(1000)})
    state_file = newest / "state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # a crash mid-write
    (tmp_path / ".tmp-checkpoint-stray").mkdir()  # an unfinished temporary directory
    with pytest.warns(RuntimeWarning, match="incomplete or corrupt"):
        step, state, path = load_latest(tmp_path)
    assert step == 1 and torch.equal(state["x"], torch.ones(1000))


def test_unknown_config_keys_are_named():
    with pytest.raises(KeyError, match="'trainer.stepz'"):
        from_dict({"trainer": {"stepz": 3}})
    with pytest.raises(KeyError, match="'modle'"):
        from_dict({"modle": {}})
    with pytest.raises(ValueError, match="trainer.proposal must be"):
        Trainer(tiny_cfg(trainer={"proposal": "sometimes"}))


def test_choices_are_typed_and_checked_the_same_from_python_and_hydra():
    """A choice key is a str enum: a string from Python becomes its member (equal to the string), a value
    outside the set is refused naming key, value and the valid ones — by validate() and by Hydra's schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from fdiv_align.config import Baseline, Config, Quantization, Schedule, TrainerConfig, validate

    cfg = Config(trainer=TrainerConfig(schedule="linear", baseline="moving_average"))
    validate(cfg)
    assert cfg.trainer.schedule is Schedule.linear and cfg.trainer.schedule == "linear"
    assert cfg.trainer.baseline is Baseline.moving_average and f"{cfg.trainer.baseline}" == "moving_average"
    with pytest.raises(ValueError, match="trainer.baseline must be one of none, moving_average, constant, loo, "
                                         "got 'median'"):
        validate(from_dict({"trainer": {"baseline": "median"}}))
    with pytest.raises(ValueError, match="model.quantization must be one of 4bit, 8bit, got '16bit'"):
        validate(from_dict({"model": {"quantization": "16bit"}}))
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.to_object(OmegaConf.merge(schema, {"model": {"quantization": "4bit"}}))
    assert merged.model.quantization is Quantization["4bit"]
    with pytest.raises(ValidationError, match="expected one of \\[constant, linear\\]"):
        OmegaConf.merge(schema, {"trainer": {"schedule": "cosine"}})


def test_cli_typo_fails_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fdiv_align", "model=tiny", "trainer=smoke", "trainer.stepz=3",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != 0
    assert "stepz" in out.stderr + out.stdout


def test_cli_multirun_over_four_divergences(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "fdiv_align", "-m", "model=tiny", "trainer=smoke", "task=amazing",
                          "divergence=rkl,fkl,js,tv", "logger.progress=false", f"hydra.sweep.dir={sweep}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    divs = sorted(json.loads(p.read_text())["divergence"] for p in summaries)
    assert divs == ["fkl", "js", "rkl", "tv"]
    for p in summaries:
        run = p.parent
        assert (run / ".hydra" / "config.yaml").exists()
        records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert {r["kind"] for r in records} >= {"train", "eval"}
    # the report command: one base row + one row per divergence, plots, byte-for-byte regeneration
    from fdiv_align.report import main as report

    out_md, plots = tmp_path / "report" / "table.md", tmp_path / "report" / "plots"
    report([str(sweep), "--out", str(out_md), "--plots", str(plots)])
    first = out_md.read_text()
    rows = [l for l in first.splitlines() if l.startswith("| ")]
    assert any(l.startswith("| base (untuned)") for l in rows)
    for div in ("rkl", "fkl", "js", "tv"):
        assert any(l.startswith(f"| {div} |") for l in rows), div
    assert sorted(p.name for p in plots.glob("*.png")) == ["amazing_alignment_curve.png", "amazing_kl_p_pi_curve.png",
                                                           "amazing_tradeoff.png"]
    pngs = {p.name: p.read_bytes() for p in plots.glob("*.png")}
    report([str(sweep), "--out", str(out_md), "--plots", str(plots)])
    assert out_md.read_text() == first
    assert {p.name: p.read_bytes() for p in plots.glob("*.png")} == pngs


def test_lora_uses_base_with_adapters_disabled(tmp_path):
    lm = tiny_model(seed=0)
    n_base = sum(p.numel() for p in lm.model.parameters())
    original = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    tr = Trainer(tiny_cfg(model={"lora": True, "lora_r": 4}, trainer={"steps": 3, "lr": 5e-2}), lm=lm, output_dir=tmp_path)
    assert tr.policy.use_lora and tr.policy.reference is None
    n_total = sum(p.numel() for p in tr.policy.model.parameters())
    n_train = sum(p.numel() for p in tr.policy.trainable.values())
    assert n_total == n_base + n_train  # one copy of the base weights, plus the adapters
    ref = tiny_model(seed=0)
    batch = tr._sample(torch.zeros(4, dtype=torch.long), torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    tr.train()
    from fdiv_align.lm.scoring import score

    with torch.no_grad():
        expected = score(ref.model, batch, pad_id=ref.tokenizer.pad_token_id)[1].double()
        moved = tr.policy.policy_logprobs(batch).double()
    assert torch.allclose(tr.policy.reference_logprobs(batch), expected, atol=1e-5)  # a(x) = the untouched base
    assert (moved - expected).abs().max() > 1e-3  # while the policy has moved
    for n, p in tr.policy.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, original[n.replace("base_layer.", "")])


def test_untrainable_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="match no module"):
        Trainer(tiny_cfg(model={"lora": True, "lora_target_modules": ["no_such_proj"]}), output_dir=tmp_path)
    from peft import LoraConfig, get_peft_model

    lm = tiny_model()
    peft_model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    for p in peft_model.parameters():
        p.requires_grad_(False)
    lm.model = peft_model
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(tiny_cfg(), lm=lm, output_dir=tmp_path)


def test_jsonl_samples_and_wandb_offline(tmp_path):
    Trainer(tiny_cfg(logger={"wandb": True, "wandb_mode": "offline"}), output_dir=tmp_path).train()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("loss", "alignment", "ess", "kl_pi_a", "samples_per_second"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in train), key
    samples = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "text", "context", "alignment"} <= set(samples[0])
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    import wandb
    from wandb_reader import history  # wandb only where this test runs

    wandb.teardown()  # wandb's service writes the run file in the background: stop it so the file is complete

    rows = history(runs[0])
    assert [r["_step"] for r in rows] == list(range(0, 7))  # one history row per training step
    by_step = {r["_step"]: r for r in rows}
    for rec in train:
        assert by_step[rec["step"]]["train/alignment"] == pytest.approx(rec["alignment"])
    assert "eval/distinct_2" in by_step[3]
    assert any(k.startswith("samples/") for k in by_step[3])  # the generated-samples table


def test_kernel_on_off_same_loss_and_gradients(tmp_path):
    grads, losses = [], []
    for fused in (True, False):
        tr = Trainer(tiny_cfg(trainer={"fused_logprobs": fused}), lm=tiny_model(seed=3), output_dir=tmp_path / str(fused))
        g = torch.Generator().manual_seed(0)
        batch = tr._sample(torch.zeros(8, dtype=torch.long), torch.rand(8, 6, generator=g, dtype=torch.float64))
        tr.policy.model.zero_grad()
        coef = torch.linspace(-1, 1, 8)
        loss = tr.policy_loss(batch, coef, 8)  # the trainer's surrogate, fused kernel on or off
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in tr.policy.trainable.items()})
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


RECOMPILE_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_cfg
from fdiv_align.training.trainer import Trainer
cfg = tiny_cfg(trainer={{"steps": 20, "samples_per_step": 6, "micro_batch_size": 6, "eval_every": 0,
                        "checkpoint_every": 0, "compile": True}}, task={{"max_new_tokens": 4}})
tr = Trainer(cfg, output_dir={out!r})
shapes = set()
orig = tr.policy_loss
def spy(batch, coefficients, n_total):
    shapes.add(tuple(batch.tokens.shape))
    return orig(batch, coefficients, n_total)
tr.policy_loss = spy
def vary_length(trainer, step, record):  # lengths 4, 7, 10 in steps 1-3, then 4..10 in any order
    trainer.max_new_tokens = 4 + (step * 3) % 7
    if step == 3:  # every kernel has been compiled: from here on a recompilation raises (public API)
        torch.compiler.set_stance("fail_on_recompile")
tr.callbacks.append(vary_length)
tr.train()
print(json.dumps({{"shapes": len(shapes)}}))
"""


def test_no_recompilation_storm(tmp_path):
    """A fresh process, 20 steps whose sequence lengths vary: after three warm-up steps no kernel is
    recompiled (``torch.compiler.set_stance("fail_on_recompile")`` turns a recompilation into an error)."""
    code = RECOMPILE_SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shapes"] >= 5  # the lengths really varied after the warm-up


def test_model_device_is_resolved_and_checked(tmp_path):
    from fdiv_align.lm.models import resolve_device

    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, msg in (("meta", "only 'cpu' and 'cuda"), ("not a device", "is not a torch device")):
        with pytest.raises(ValueError, match=msg):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            Trainer(tiny_cfg(model={"device": "cuda"}), lm=tiny_model(seed=1), output_dir=tmp_path)
    tr = Trainer(tiny_cfg(model={"device": "cpu"}), lm=tiny_model(seed=1), output_dir=tmp_path)
    assert tr.device == torch.device("cpu") and {p.device.type for p in tr.policy.model.parameters()} == {"cpu"}


def test_cli_defaults_equal_the_dataclass_defaults():
    """`fdiv-align` with no overrides composes exactly Config(): the Python API and the CLI run the same job
    (task.params: the YAML states the builder's defaults, the dataclass leaves them to the builder)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fdiv_align.cli import _config_dir
    from fdiv_align.config import Config, register_configs, to_dict
    from fdiv_align.targets.tasks import get_task

    register_configs()
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        composed = OmegaConf.to_object(compose(config_name="config"))
    cli, api = to_dict(composed), to_dict(Config())
    cli_task_params, api_task_params = cli["task"].pop("params"), api["task"].pop("params")
    assert cli == api
    cli_task, api_task = get_task(cli["task"]["name"], **cli_task_params), get_task(api["task"]["name"], **api_task_params)
    assert (cli_task.description, cli_task.max_new_tokens, cli_task.contexts) == \
        (api_task.description, api_task.max_new_tokens, api_task.contexts)  # description names β


def test_eval_at_start_false_skips_only_the_base_evaluation_and_eval_batching_does_not_change_it(tmp_path):
    """trainer.eval_at_start = false: no step-0 evaluation (summary "base" is None), the final one is made;
    the evaluation sample does not depend on eval_micro_batch_size (per-row uniforms); the target-p record
    is made for pure sampling and refused under top-k (π's support may miss p's)."""
    lm, _ = enumerable_lm()
    cfg = toy_cfg("fkl", steps=2)
    cfg.trainer.eval_at_start = False
    cfg.logger.jsonl = True
    tr = Trainer(cfg, lm=lm, task=toy_task("fkl"), output_dir=tmp_path / "a")
    summary = tr.train()
    evals = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert summary["base"] is None and [e["step"] for e in evals] == [2]
    assert summary["final"]["qrs_proposed"] == cfg.trainer.eval_samples // 2 and summary["final"]["target_contexts"] >= 1
    one, _ = tr.evaluate()
    tr.evaluator.micro = 3
    other, _ = tr.evaluate()
    assert one["alignment"] == other["alignment"] and one["qrs_samples"]["texts"] == other["qrs_samples"]["texts"]
    cfg = toy_cfg("fkl", steps=0)
    cfg.trainer.top_k = 2
    rec, _ = Trainer(cfg, lm=lm, task=toy_task("fkl"), output_dir=tmp_path / "b").evaluate()
    assert "alignment" in rec and not any(k.startswith(("target_", "qrs_")) for k in rec)
    with pytest.raises(ValueError, match="eval_at_start = false would evaluate nothing"):
        cfg.trainer.eval_at_start = False
        validate(cfg)
