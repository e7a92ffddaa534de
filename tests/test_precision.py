"""trainer.precision=auto and trainer.compile=auto: each detection outcome forced, and the path the
trainer then takes checked end to end (autocast dtype, head GEMM dtype, frozen weights' dtype, the
kernel's compile flag, the line printed at start and summary.json)."""

import importlib
import json

import pytest
import torch
from conftest import tiny_cfg

from fdiv_align.lm import precision
from fdiv_align.lm.models import tiny_model
from fdiv_align.training.trainer import Trainer


def _run(tmp_path, capsys, **trainer):
    cfg = tiny_cfg(trainer={"steps": 2, "eval_every": 0, "checkpoint_every": 0, **trainer},
                   model={"lora": True, "lora_r": 4})
    tr = Trainer(cfg, lm=tiny_model(seed=3), output_dir=tmp_path)
    summary = tr.train()
    return tr, summary, capsys.readouterr().err


CPU = torch.device("cpu")


@pytest.mark.parametrize("features,speedup,expected", [
    ([], None, "fp32"),                       # AVX2 only: no probe needed
    (["avx512_bf16"], 0.05, "fp32"),          # flag present but the measured bf16 GEMM is slow
    (["amx_bf16", "avx512_bf16"], 3.0, "bf16"),  # native bf16 and measured faster
    (None, 2.0, "bf16"),                      # flags unreadable (not Linux): the measurement decides
])
def test_auto_outcomes_end_to_end(tmp_path, capsys, monkeypatch, features, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: features)
    probed = []
    monkeypatch.setattr(precision, "bf16_speedup", lambda use_cache=True: probed.append(1) or speedup)
    tr, summary, err = _run(tmp_path, capsys, precision="auto")
    assert bool(probed) == (speedup is not None)
    assert tr.plan.precision == expected and summary["compute"]["precision"] == expected
    assert json.loads((tmp_path / "summary.json").read_text())["compute"]["precision"] == expected
    want = torch.bfloat16 if expected == "bf16" else None
    assert tr.plan.autocast_dtype == want and tr.plan.head_dtype == want
    frozen = {p.dtype for n, p in tr.policy.model.named_parameters() if "base_layer" in n and not p.requires_grad}
    assert frozen == {torch.bfloat16 if expected == "bf16" else torch.float32}  # the LoRA fast path followed
    assert f"precision {expected}" in err and "auto:" in err  # the choice and its reason, said at start
    assert summary["status"] == "finished"


def test_explicit_precisions_skip_the_probe(monkeypatch):
    monkeypatch.setattr(precision, "bf16_speedup", lambda use_cache=True: pytest.fail("probed"))
    assert precision.choose_precision("fp32", CPU)[0] == "fp32"
    assert precision.choose_precision("bf16", CPU)[0] == "bf16"
    with pytest.raises(ValueError, match="trainer.precision must be one of auto, fp32, bf16, got 'half'"):
        precision.choose_precision("half", CPU)


def test_probe_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FDIV_ALIGN_CACHE", str(tmp_path))
    first = precision.bf16_speedup()
    files = list((tmp_path / "probes").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["speedup"] == first
    monkeypatch.setattr(precision, "_time_gemm", lambda *a: pytest.fail("re-measured despite the cache"))
    assert precision.bf16_speedup() == first


def test_no_compiler_means_eager_with_one_line(tmp_path, capsys, monkeypatch):
    """Without a C++ compiler inductor fails (InvalidCxxCompiler): auto must choose the eager kernels,
    say so, and train; compile=true must refuse at start naming the reason."""
    monkeypatch.setattr(precision, "_cxx_compiler", lambda: None)
    calls = []
    tl = importlib.import_module("fdiv_align.kernels.token_logprobs")  # the module, not the function
    real_get = tl._get
    monkeypatch.setattr(tl, "_get", lambda fn, compile: calls.append(compile) or real_get(fn, compile))
    tr, summary, err = _run(tmp_path / "a", capsys, compile=None)
    assert tr.plan.compile is False and summary["compute"]["compile"] is False
    assert calls and not any(calls)  # every kernel call ran eagerly
    assert "torch.compile off (auto: no working C++ compiler" in err
    with pytest.raises(RuntimeError, match="trainer.compile=true but torch.compile cannot build kernels here"):
        Trainer(tiny_cfg(trainer={"compile": True}), lm=tiny_model(seed=3), output_dir=tmp_path / "b")


def test_compile_false_runs_the_eager_kernels(tmp_path, capsys, monkeypatch):
    tl = importlib.import_module("fdiv_align.kernels.token_logprobs")  # the module, not the function
    calls = []
    real_get = tl._get
    monkeypatch.setattr(tl, "_get", lambda fn, compile: calls.append(compile) or real_get(fn, compile))
    tr, _, err = _run(tmp_path, capsys, compile=False)
    assert calls and not any(calls) and "torch.compile off (trainer.compile=false)" in err


@pytest.mark.parametrize("features,speedup,bf16", [([], None, False), (["amx_bf16"], 3.0, True)])
def test_trl_integration_follows_the_same_decision(monkeypatch, features, speedup, bf16):
    from fdiv_align.integrations.trl import rloo_config_kwargs

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: features)
    monkeypatch.setattr(precision, "bf16_speedup", lambda use_cache=True: speedup)
    assert rloo_config_kwargs(exact=False, device="cpu")["bf16"] is bf16
    assert rloo_config_kwargs(exact=True, device="cpu")["bf16"] is False  # exact: fp32 always
