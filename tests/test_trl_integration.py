"""fdiv_align inside TRL's RLOOTrainer: two steps on a tiny model; TRL's gradient equals ours."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]' (CI installs it)")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fdiv_align import f_dpg_loss  # noqa: E402
from fdiv_align.objectives.estimators import LeaveOneOutBaseline  # noqa: E402
from fdiv_align.integrations.trl import FDivergenceReward, rloo_config_kwargs  # noqa: E402
from fdiv_align.lm.models import tiny_model  # noqa: E402
from fdiv_align.lm.scoring import score  # noqa: E402
from fdiv_align.targets import RewardScorer  # noqa: E402


class CompareGradients(TrainerCallback):
    """Before each optimiser step: ours (f_dpg_loss with the leave-one-out baseline on the samples the reward
    scored) against TRL's gradient — (max |difference|, largest |gradient|, tensors compared ×2) into ``checks``;
    also asserts the pseudo-rewards and the log π the reward used."""

    def __init__(self, reward, divergence, checks):
        self.reward, self.divergence, self.checks = reward, divergence, checks

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trl_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        last = self.reward.last
        ours = copy.deepcopy(model)
        ours.zero_grad()
        lp = score(ours, last["batch"], pad_id=self.reward.tokenizer.pad_token_id)[1]
        assert float((lp.detach().double() - last["log_pi"]).abs().max()) <= 1e-5  # the prompt TRL sampled under
        out = f_dpg_loss(lp, lp.detach(), last["log_P"], self.divergence, last["log_z"], baseline=LeaveOneOutBaseline())
        out.loss.backward()
        assert torch.allclose(out.pseudo_rewards, last["rewards"], atol=1e-5)
        diffs = {n: float((p.grad - trl_grads[n]).abs().max()) for n, p in ours.named_parameters() if p.grad is not None}
        scale = max(float(g.abs().max()) for g in trl_grads.values())
        self.checks.append((max(diffs.values()), scale, len(diffs), len(trl_grads)))


@pytest.mark.parametrize("divergence", ["js", "rkl"])
def test_trl_rloo_gradient_equals_ours(tmp_path, divergence):
    lm = tiny_model(seed=0, logit_scale=3.0)
    scorer = RewardScorer(lambda t, c: [len(x) / 10 for x in t], beta=0.5, name="length")  # varies across samples
    reward = FDivergenceReward(lm.model, lm.tokenizer, scorer, divergence=divergence)
    checks = []

    args = trl.RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=5, learning_rate=1e-2, max_steps=2, use_cpu=True, report_to="none",
                          save_strategy="no", logging_steps=100, max_grad_norm=0.0, disable_dropout=True,
                          dataloader_num_workers=0, **rloo_config_kwargs())
    trainer = trl.RLOOTrainer(model=lm.model, reward_funcs=reward, args=args, processing_class=lm.tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": "the cat is"}] * 8))
    trainer.add_callback(CompareGradients(reward, divergence, checks))
    trainer.train()
    assert len(checks) == 2  # two optimiser steps, each compared
    for max_diff, scale, n_ours, n_trl in checks:
        assert n_ours == n_trl and scale > 0
        assert max_diff <= 1e-5 + 1e-4 * scale, (max_diff, scale)


def test_trl_reward_floors_phi_not_p():
    """rkl with a pointwise scorer: Φ = 0 needs log_phi_floor (a clear error without it); with it
    log P = log a + max(log Φ, floor) — the trainer's convention — for the rows the scorer rejects."""
    from fdiv_align.targets import BooleanScorer

    lm = tiny_model(seed=0, logit_scale=3.0)
    scorer = BooleanScorer(lambda t, c: "cat" in t, name="has_cat")
    prompts = ["the cat is"] * 6
    ids = [[5, 6, 7][: 1 + i % 3] for i in range(6)]
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    phi_zero = torch.tensor(["cat" not in t for t in texts])
    assert phi_zero.any() and (~phi_zero).any()  # both kinds of row
    with pytest.raises(ValueError, match="pass log_phi_floor"):
        FDivergenceReward(lm.model, lm.tokenizer, scorer, divergence="rkl")(prompts, texts, completion_ids=ids)
    reward = FDivergenceReward(lm.model, lm.tokenizer, scorer, divergence="rkl", log_phi_floor=-7.0)
    reward(prompts, texts, completion_ids=ids)
    log_a = reward.policy.reference_logprobs(reward.last["batch"])
    want = log_a + torch.where(phi_zero, torch.tensor(-7.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert torch.equal(reward.last["log_P"], want)


CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<bos> she :{% endif %}")


@pytest.mark.parametrize("divergence, chat", [("js", False), ("rkl", True)])
def test_trl_grpo_gradient_equals_ours(tmp_path, divergence, chat):
    """GRPO with grpo_config_kwargs() and rewards scaled by grpo_reward_scale(N, L) takes the f-DPG gradient
    (leave-one-out baseline), for plain and for conversational prompts (scored under the prompt TRL sampled
    under: the chat template with the generation prompt)."""
    from fdiv_align.integrations.trl import grpo_config_kwargs, grpo_reward_scale

    lm = tiny_model(seed=0, logit_scale=3.0)
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    N, L = 4, 5
    scorer = RewardScorer(lambda t, c: [len(x) / 10 for x in t], beta=0.5, name="length")
    reward = FDivergenceReward(lm.model, lm.tokenizer, scorer, divergence=divergence, reward_scale=grpo_reward_scale(N, L))
    checks = []

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=N, num_generations=N,
                          max_completion_length=L, learning_rate=1e-2, max_steps=2, use_cpu=True, report_to="none",
                          save_strategy="no", logging_steps=100, max_grad_norm=0.0, disable_dropout=True,
                          dataloader_num_workers=0, **grpo_config_kwargs())
    prompt = [{"role": "user", "content": "the cat is"}] if chat else "the cat is"
    trainer = trl.GRPOTrainer(model=lm.model, reward_funcs=reward, args=args, processing_class=lm.tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": prompt}] * 8))
    trainer.add_callback(CompareGradients(reward, divergence, checks))
    trainer.train()
    assert len(checks) == 2
    if chat:
        assert set(reward.last["batch"].contexts) == {"<bos> user : the cat is <bos> she :"}
    for max_diff, scale, n_ours, n_trl in checks:
        assert n_ours == n_trl and scale > 0
        assert max_diff <= 1e-5 + 1e-4 * scale, (max_diff, scale)
    with pytest.raises(ValueError, match="num_generations ≥ 2"):
        grpo_reward_scale(1, L)
