"""Optimise an f-divergence objective inside TRL's online trainers (RLOO).

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

The base a(x) is the policy with its PEFT adapters disabled when the model is a ``PeftModel``,
otherwise a frozen copy taken when the reward is built (before training starts).
"""

from __future__ import annotations

import copy

import torch

from ..objectives.divergences import floored_log_target, get_divergence, needs_floor
from ..objectives.estimators import LogZAccumulator
from ..lm.policy import Policy
from ..lm.precision import compute_plan
from ..lm.sampling import Batch, SamplingConfig, pad_rows

__all__ = ["FDivergenceReward", "rloo_config_kwargs"]


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


class FDivergenceReward:
    """A TRL reward function returning f-DPG pseudo-rewards −f′(π/p) (see module docstring).

    Call signature (TRL's): ``reward(prompts, completions, completion_ids, **kwargs) -> list[float]``.
    ``log_phi_floor``: as the trainer's ``divergence.log_phi_floor`` — for divergences infinite where
    P = 0 (rkl, chi2, alpha ≥ 1) with pointwise scorers, log P = log a + max(log Φ, floor).
    ``last`` keeps the tensors of the latest call (for inspection and tests).
    """

    def __init__(self, model, tokenizer, scorer, divergence="js", log_phi_floor: float | None = None):
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
        prompts = [p if isinstance(p, str) else self.tokenizer.apply_chat_template(p, tokenize=False) for p in prompts]
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
        return [None if r != r else float(r) for r in rewards.tolist()]
