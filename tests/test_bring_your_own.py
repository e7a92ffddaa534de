"""Bringing your own reward and model: a Python function named as ``package.module:function`` (one or two
arguments), a Hugging Face sequence-classification directory (one label: its logit), LoRA on any
architecture (``all-linear``) — from Python and from the CLI, each bad input refused by name before a
model loads."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fdiv_align.targets.scorers import ClassifierReward, ScorerError
from fdiv_align.targets.tasks import get_task

REWARDS = textwrap.dedent('''
    def count_a(texts):
        return [t.split().count("a") for t in texts]

    def with_contexts(texts, contexts):
        return [float(len(c)) for c in contexts]

    def too_few(texts):
        return [1.0]

    def not_finite(texts):
        return [float("nan")] * len(texts)

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_reward_function_by_name_with_one_or_two_arguments(rewards_module):
    scorer = get_task("reward_function", function="my_rewards:count_a", beta=0.5).scorer
    assert scorer.log_scores(["a a b", "b"], ["", ""]).tolist() == [4.0, 0.0]  # r/β
    scorer = get_task("reward_function", function="my_rewards:with_contexts").scorer
    assert scorer.rewards(["x", "y"], ["ab", "abc"]).tolist() == [2.0, 3.0]
    with pytest.raises(ScorerError, match="my_rewards:too_few' returned 1 values for 2 texts"):
        get_task("reward_function", function="my_rewards:too_few").scorer.rewards(["a", "b"], ["", ""])
    with pytest.raises(ScorerError, match="my_rewards:not_finite' returned nan"):
        get_task("reward_function", function="my_rewards:not_finite").scorer.rewards(["a"], [""])


@pytest.mark.parametrize("spec, message", [
    ("my_rewards", "expected 'package.module:function'"),
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:NOT_A_FUNCTION", "is a int, not a function"),
    (None, "needs task.params.function"),
])
def test_a_bad_reward_function_is_named(rewards_module, spec, message):
    with pytest.raises(ValueError, match=message):
        get_task("reward_function", function=spec)


def _classifier(tmp_path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fdiv_align.lm.models import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id, num_labels=num_labels,
                         id2label={i: f"L{i}" for i in range(num_labels)}, label2id={f"L{i}": i for i in range(num_labels)})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path / f"clf{num_labels}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def test_a_one_label_reward_model_scores_its_logit_not_zero(tmp_path):
    model, tok, path = _classifier(tmp_path, 1)
    texts = ["the cat is happy", "a dog"]
    r = ClassifierReward(str(path)).rewards(texts, ["", ""])
    with torch.no_grad():
        want = [float(model(**tok([t], return_tensors="pt")).logits[0, 0]) for t in texts]
    assert r.tolist() == pytest.approx(want, rel=1e-5) and float(r.abs().min()) > 0
    task = get_task("classifier", path=str(path), beta=2.0)
    assert task.scorer.log_scores(texts, ["", ""]).tolist() == pytest.approx([w / 2 for w in want], rel=1e-5)


def test_a_several_label_classifier_needs_its_label_named(tmp_path):
    model, tok, path = _classifier(tmp_path, 3)
    with pytest.raises(ValueError, match=r"has 3 labels \['L0', 'L1', 'L2'\]: name the one"):
        ClassifierReward(str(path))
    r = ClassifierReward(str(path), label="L2").rewards(["a dog"], [""])
    with torch.no_grad():
        want = torch.log_softmax(model(**tok(["a dog"], return_tensors="pt")).logits, -1)[0, 2]
    assert float(r[0]) == pytest.approx(float(want), rel=1e-5) and float(r[0]) < 0
    with pytest.raises(ValueError, match="is not a Hugging Face model directory"):
        get_task("classifier", path=str(tmp_path / "nowhere"))


def test_all_linear_lora_adapts_gpt2_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fdiv_align.config import ModelConfig
    from fdiv_align.lm.models import lora_wrap

    model = lora_wrap(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), ModelConfig())
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"c_attn", "c_proj", "c_fc"}  # Conv1D layers; not the output head
    with pytest.raises(ValueError, match="'all-linear' stands alone"):
        lora_wrap(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)),
                  ModelConfig(lora_target_modules=["all-linear", "c_fc"]))


def test_the_cli_trains_towards_your_reward_function_with_lora(rewards_module, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rewards_module), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "fdiv_align", "model=tiny", "trainer=smoke", "model.lora=true",
                          "task=reward_function", "task.params.function=my_rewards:count_a", "task.params.beta=1.0",
                          "logger.progress=false", f"output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "reward_function" and summary["lora"] and math.isfinite(summary["final"]["alignment"])
    assert (tmp_path / "run" / "final_model" / "adapter_config.json").exists()
    bad = subprocess.run([sys.executable, "-m", "fdiv_align", "model=tiny", "trainer=smoke", "task=reward_function",
                          "task.params.function=my_rewards:nope", f"output_dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "has no attribute 'nope'" in bad.stderr and "loading model" not in bad.stderr


CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<bos> she :{% endif %}")


def test_prompts_from_a_datasets_directory_and_jsonl_columns(tmp_path):
    import datasets

    from fdiv_align.targets import load_contexts

    chats = [[{"role": "user", "content": "the cat"}], [{"role": "system", "content": "x"}, {"role": "user", "content": "a dog"}]]
    datasets.Dataset.from_dict({"messages": chats, "id": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert load_contexts(tmp_path / "ds") == chats
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "q1", "prompt": "p1"}) + "\n")
    assert load_contexts(tmp_path / "p.jsonl") == ["p1"] and load_contexts(tmp_path / "p.jsonl", "question") == ["q1"]
    with pytest.raises(ValueError, match=r"p.jsonl:1: the row has 'answer' .*set task.prompt_column"):
        load_contexts(tmp_path / "p.jsonl", "answer")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="a context is a string or a list of"):
        load_contexts(tmp_path / "bad.jsonl")
    (tmp_path / "notds").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        load_contexts(tmp_path / "notds")


def test_conversational_prompts_are_rendered_with_the_generation_prompt_and_one_bos(tmp_path):
    import datasets
    from conftest import tiny_cfg

    from fdiv_align.lm.batch import encode_contexts, render_contexts
    from fdiv_align.lm.models import tiny_model
    from fdiv_align.training.trainer import Trainer

    lm = tiny_model(seed=1)
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "the cat"}]
    rendered = render_contexts(lm.tokenizer, [chat, "a dog"])
    assert rendered == ["<bos> user : the cat <bos> she :", "a dog"]
    assert render_contexts(lm.tokenizer, ["a dog"], chat_template=True) == ["<bos> user : a dog <bos> she :"]
    bos = lm.tokenizer.bos_token_id
    for ids in encode_contexts(lm.tokenizer, rendered):
        assert ids[0] == bos and ids[1] != bos  # one BOS, never two
    datasets.Dataset.from_dict({"messages": [chat]}).save_to_disk(str(tmp_path / "ds"))
    tr = Trainer(tiny_cfg(task={"contexts": str(tmp_path / "ds")}), lm=lm, output_dir=tmp_path / "run")
    assert tr.contexts == ["<bos> user : the cat <bos> she :"]
    batch = tr._sample(torch.zeros(2, dtype=torch.long), torch.rand(2, 6, generator=torch.Generator().manual_seed(0),
                                                                  dtype=torch.float64))
    prompt = batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
    assert prompt == encode_contexts(lm.tokenizer, tr.contexts)[0] and prompt.count(bos) == 2  # the template's two turns
    plain = tiny_model(seed=1)
    with pytest.raises(ValueError, match="needs a chat template, and the tokenizer has none"):
        render_contexts(plain.tokenizer, [chat])
