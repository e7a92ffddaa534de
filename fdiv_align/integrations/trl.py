"""Optimise an f-divergence objective inside TRL's online trainers (RLOO, GRPO).

TRL's ``RLOOTrainer`` (with ``beta=0``, ``num_iterations=1``, ``normalize_advantages=False``)
computes, for the N = num_generations samples of a prompt, advantages A_i = r_i − mean_{j≠i} r_j
and the loss −(1/N) Σ_i A_i log π(x_i) (its clipped ratio is exactly 1 on the first iteration).
:class:`FDivergenceReward` is a TRL reward function that returns the f-DPG pseudo-reward
r_i = R_i = −f′(π(x_i)/p(x_i)) computed from the current policy, the base model and the target
scorer, with log Ẑ accumulated per prompt. TRL's leave-one-out baseline is then our ``loo``
baseline, and its gradient equals :func:`fdiv_align.f_dpg_loss`'s (on-policy, w ≡ 1) for the
same samples — ``tests/test_trl_integration.py`` checks this on a tiny model.

    from trl import RLOOConfig, RLOOTrainer
    from fdiv_align.integrations.trl import FDivergenceReward, rloo_config_kwargs
    reward = FDivergenceReward(model, tokenizer, scorer=WordPresent("amazing"), divergence="js")
    trainer = RLOOTrainer(model=model, reward_funcs=reward, processing_class=tokenizer, train_dataset=ds,
                          args=RLOOConfig(output_dir="out", num_generations=8, per_device_train_batch_size=8,
                                          **rloo_config_kwargs()))

GRPO (``GRPOTrainer``): with :func:`grpo_config_kwargs` (``loss_type="dr_grpo"``, ``scale_rewards="none"``,
``beta=0``, ``num_iterations=1``) and the rewards scaled by :func:`grpo_reward_scale` — N·L/(N−1), N =
``num_generations``, L = ``max_completion_length`` — GRPO's update is the same f-DPG gradient:

    reward = FDivergenceReward(model, tokenizer, scorer, divergence="js", reward_scale=grpo_reward_scale(8, 64))
    args = GRPOConfig(output_dir="out", num_generations=8, max_completion_length=64, **grpo_config_kwargs())

GRPO's defaults (``dapo``, rewards divided by the group's standard deviation) take another gradient.

The base a(x) is the policy with its PEFT adapters disabled when the model is a ``PeftModel``,
otherwise a frozen copy taken when the reward is built (before training starts).
"""

from __future__ import annotations

import copy
import math

import torch

from ..objectives.divergences import floored_log_target, get_divergence, needs_floor
from ..objectives.estimators import LogZAccumulator
from ..lm.policy import Policy
from ..lm.precision import compute_plan
from ..lm.sampling import Batch, SamplingConfig, pad_rows

__all__ = ["FDivergenceReward", "rloo_config_kwargs", "grpo_config_kwargs", "grpo_reward_scale"]


def rloo_config_kwargs(exact: bool = True, precision: str = "auto", device=None) -> dict:
    """RLOOConfig settings under which TRL's loss is the f-DPG loss with a leave-one-out baseline.

    ``exact``: fp32 (TRL's mixed precision off: transformers enables bf16 autocast by default on CPUs
    with bf16 support, which moves sequence log-probs by ~1e-2 nats). Otherwise TRL's ``bf16`` follows
    the same hardware decision as our trainer (:func:`fdiv_align.lm.precision.choose_precision` for
    ``precision`` = auto | fp32 | bf16 on ``device``, default: cuda when visible, else cpu) — never bf16
    on a CPU that runs bf16 products in a slow fallback."""
    from ..lm.models import resolve_device
    from ..lm.precision import choose_precision

    kw = {"beta": 0.0, "num_iterations": 1, "normalize_advantages": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    chosen = "fp32" if exact else choose_precision(precision, resolve_device(device))[0]
    kw.update(bf16=chosen == "bf16", fp16=False)
    return kw


def grpo_config_kwargs(exact: bool = True, precision: str = "auto", device=None) -> dict:
    """GRPOConfig settings under which GRPO's update is the f-DPG gradient with a leave-one-out baseline,
    given rewards multiplied by :func:`grpo_reward_scale` (``FDivergenceReward(..., reward_scale=...)``).

    With ``loss_type="dr_grpo"``, ``scale_rewards="none"``, ``beta=0``, ``num_iterations=1`` (the clipped
    ratio is exactly 1) GRPO's loss is −Σ_i (r_i − mean_group r) Σ_t log π(x_i,t) / (B·L), B the completions
    of the step and L = ``max_completion_length``; the f-DPG loss with the leave-one-out baseline is
    −(1/B) Σ_i N/(N−1)·(R_i − mean_group R) log π(x_i), N = ``num_generations``. They are equal when
    r = R·N·L/(N−1). GRPO's defaults (``dapo``, rewards divided by the group's standard deviation) give
    another gradient. ``exact``/``precision``/``device``: as :func:`rloo_config_kwargs`."""
    kw = {k: v for k, v in rloo_config_kwargs(exact, precision, device).items() if k != "normalize_advantages"}
    kw.update(loss_type="dr_grpo", scale_rewards="none", mask_truncated_completions=False, top_entropy_quantile=1.0,
              importance_sampling_level="token", multi_objective_aggregation="sum_then_normalize", delta=None)
    return kw


def grpo_reward_scale(num_generations: int, max_completion_length: int) -> float:
    """N·L/(N−1): the factor on the pseudo-rewards that makes GRPO's update (:func:`grpo_config_kwargs`) the
    f-DPG gradient with a leave-one-out baseline."""
    if num_generations < 2 or max_completion_length < 1:
        raise ValueError(f"GRPO needs num_generations ≥ 2 and max_completion_length ≥ 1, got {num_generations}, "
                         f"{max_completion_length}")
    return num_generations * max_completion_length / (num_generations - 1)


class FDivergenceReward:
    """A TRL reward function returning f-DPG pseudo-rewards −f′(π/p) (see module docstring).

    Call signature (TRL's): ``reward(prompts, completions, completion_ids, **kwargs) -> list[float]``.
    ``log_phi_floor``: as the trainer's ``divergence.log_phi_floor`` — for divergences infinite where
    P = 0 (rkl, chi2, alpha ≥ 1) with pointwise scorers, log P = log a + max(log Φ, floor).
    ``reward_scale`` multiplies the returned rewards (GRPO: :func:`grpo_reward_scale`; RLOO: 1).
    Conversational prompts are rendered as TRL renders them for sampling — the chat template with the
    generation prompt (or continuing a final assistant message) — so log π is the one TRL sampled under.
    ``last`` keeps the tensors of the latest call (for inspection and tests).
    """

    def __init__(self, model, tokenizer, scorer, divergence="js", log_phi_floor: float | None = None,
                 reward_scale: float = 1.0):
        if not (reward_scale > 0 and math.isfinite(reward_scale)):
            raise ValueError(f"reward_scale must be a finite number > 0, got {reward_scale!r}")
        self.reward_scale = float(reward_scale)
        self.model = model
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.divergence = get_divergence(divergence)
        self.log_phi_floor = log_phi_floor
        self.is_peft = hasattr(model, "disable_adapter")
        reference = None if self.is_peft else copy.deepcopy(model).eval().requires_grad_(False)
        # the library's one log a (fdiv_align/lm/policy.py): adapters disabled, or the frozen copy; exact fp32
        # scoring (TRL's own precision is rloo_config_kwargs's business)
        plan = compute_plan("fp32", False, next(model.parameters()).device, fused=False)
        self.policy = Policy(model, tokenizer, self.is_peft, reference, SamplingConfig(), plan)
        self.log_z = LogZAccumulator()
        self.context_ids: dict[str, int] = {}
        self.__name__ = f"fdpg_{self.divergence.name}"
        self.last: dict | None = None

    def _batch(self, prompts, completion_ids) -> Batch:
        tok = self.tokenizer
        prompt_ids, prompt_mask = pad_rows([tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                                           tok.pad_token_id, "left")
        tokens, mask = pad_rows(list(completion_ids), tok.pad_token_id, "right")
        for p in prompts:
            self.context_ids.setdefault(p, len(self.context_ids))
        ctx = torch.tensor([self.context_ids[p] for p in prompts])
        return Batch(ctx, list(prompts), prompt_ids, prompt_mask, tokens, mask, None, [])

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is None:
            raise ValueError("FDivergenceReward needs TRL's completion_ids (TRL ≥ 0.17 passes them)")
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        prompts = [p if isinstance(p, str) else self._render(p) for p in prompts]
        batch = self._batch(prompts, completion_ids)
        was_training = self.model.training
        self.model.eval()
        log_pi = self.policy.policy_logprobs(batch).double()
        log_a = self.policy.reference_logprobs(batch)
        self.model.train(was_training)
        log_phi = self.scorer.log_scores(texts, prompts)
        floor = self.log_phi_floor if needs_floor(self.divergence, log_phi, self.log_phi_floor, "log Φ", "log_phi_floor") \
            else None
        log_P = floored_log_target(log_a.cpu(), log_phi, floor)
        self.log_z.update(log_P, log_pi.cpu(), batch.context_index)
        log_z, known = self.log_z.log_z(batch.context_index)
        log_t = log_pi.cpu() - log_P + torch.where(known, log_z, torch.zeros_like(log_z))
        rewards = self.divergence.pseudo_reward(log_t)
        rewards = torch.where(known, rewards, torch.full_like(rewards, float("nan")))  # TRL: NaN = unscorable
        self.last = {"batch": batch, "log_pi": log_pi.cpu(), "log_P": log_P, "log_z": log_z, "rewards": rewards}
        return [None if r != r else float(r) * self.reward_scale for r in rewards.tolist()]

    def _render(self, messages) -> str:
        """A conversation as TRL prompts the model with it: the generation prompt opens the assistant's turn,
        or a final assistant message is continued."""
        if messages and messages[-1].get("role") == "assistant":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
