"""Taking the model home (fdiv_align/lm/export.py): every f-DPG run leaves ``final_model/`` — a PEFT adapter
directory after LoRA, a full model directory otherwise, with the tokenizer and the generation config — that
transformers/PEFT load with ``from_pretrained`` and that gives the trained policy's log-probs (fp32, ≤ 1e-5
nats per sequence); ``merge=True`` folds the adapters into a plain model with the same log-probs."""

import json

import pytest
import torch
from conftest import tiny_cfg

from fdiv_align.lm.export import save_final_model
from fdiv_align.lm.models import tiny_model
from fdiv_align.lm.scoring import score
from fdiv_align.training.trainer import Trainer


def _fixed_batch(tr):
    g = torch.Generator().manual_seed(7)
    return tr._sample(torch.arange(6) % len(tr.contexts), torch.rand(6, 6, generator=g, dtype=torch.float64))


def _logprobs(model, tr, batch):
    return score(model, batch, tr.policy.sampling, pad_id=tr.policy.tokenizer.pad_token_id).sequence_logprobs.double()


@pytest.mark.parametrize("lora", [False, True])
def test_final_model_loads_with_from_pretrained_and_gives_the_policys_logprobs(tmp_path, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg = tiny_cfg(model={"lora": lora}, trainer={"steps": 2, "temperature": 0.8})
    tr = Trainer(cfg, output_dir=tmp_path / "run")
    summary = tr.fit()
    out = tmp_path / "run" / "final_model"
    assert summary["final_model"] == str(out)
    files = {p.name for p in out.iterdir()}
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    with torch.no_grad():
        batch = _fixed_batch(tr)
        want = tr.policy.policy_logprobs(batch).double()
        if lora:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= files
            base = tiny_model(seed=cfg.model.seed).model
            loaded = PeftModel.from_pretrained(base, out).eval()
        else:
            assert {"config.json", "model.safetensors"} <= files
            assert json.loads((out / "config.json").read_text()).get("_attn_implementation") in (None, "sdpa")
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        got = _logprobs(loaded, tr, batch)
        assert float((got - want).abs().max()) <= 1e-5
        assert float((want - _logprobs(tiny_model(seed=cfg.model.seed).model, tr, batch)).abs().max()) > 1e-3  # it trained
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tr.policy.tokenizer.get_vocab()
    assert GenerationConfig.from_pretrained(out).temperature == 0.8


def test_merged_lora_is_a_plain_model_with_the_same_logprobs(tmp_path):
    from transformers import AutoModelForCausalLM

    tr = Trainer(tiny_cfg(model={"lora": True}, trainer={"steps": 2}), output_dir=tmp_path / "run")
    tr.fit()
    merged = save_final_model(tr.policy, tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        batch = _fixed_batch(tr)
        assert float((_logprobs(loaded, tr, batch) - tr.policy.policy_logprobs(batch).double()).abs().max()) <= 1e-5
    assert any(type(m).__name__ == "Linear" and "lora" in n for n, m in tr.policy.model.named_modules())  # untouched


@pytest.mark.parametrize("lora", [False, True])
def test_fdiv_align_export_writes_a_checkpoint_as_the_run_does(tmp_path, lora):
    """The newest checkpoint exported from the command line equals the run's own final_model/; --merge folds
    LoRA into a plain model; a missing step or run directory is named."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from fdiv_align.training.export import export_checkpoint

    tr = Trainer(tiny_cfg(model={"lora": lora}, trainer={"steps": 4, "checkpoint_every": 2}), output_dir=tmp_path / "run")
    tr.fit()
    done = subprocess.run([sys.executable, "-m", "fdiv_align.training.export", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = tmp_path / "run" / "final_model-step4"
    assert done.stdout.strip() == str(exported)
    for name in ("adapter_model.safetensors",) if lora else ("model.safetensors",):
        assert (exported / name).read_bytes() == (tmp_path / "run" / "final_model" / name).read_bytes()
    merged = export_checkpoint(tmp_path / "run", step=4, merge=True, out=tmp_path / "merged")
    with torch.no_grad():
        batch = _fixed_batch(tr)
        got = _logprobs(AutoModelForCausalLM.from_pretrained(merged).eval(), tr, batch)
        assert float((got - tr.policy.policy_logprobs(batch).double()).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match=r"no intact checkpoint of step 3; it has steps \[2, 4\]"):
        export_checkpoint(tmp_path / "run", step=3)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export_checkpoint(tmp_path)
