"""Offline f-divergence preference optimisation (f-DPO): DPO generalised to f-divergences.

Wang, Jiang, Yang, Liu, Chen (2023), "Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints". The regularised objective max_π E_π[r] − β D_f(π‖π_ref), with the
library's convention D_f(π‖π_ref) = E_{π_ref}[f(π/π_ref)] (docs/math.md), has its optimum where

    β f′(π(y|x) / π_ref(y|x)) = r(x, y) − λ(x)          (Lagrange multiplier λ(x) of Σ_y π = 1),

provided f′ is strictly increasing and f′(t) → −∞ as t → 0 (so that π > 0 wherever π_ref > 0 and the
multiplier of π ≥ 0 vanishes). The implicit reward r̂ = β f′(π/π_ref) then enters the Bradley–Terry
likelihood, where λ(x) cancels between the chosen y_w and the rejected y_l of one prompt:

    loss = −log σ( β [f′(π(y_w)/π_ref(y_w)) − f′(π(y_l)/π_ref(y_l))] ),     averaged over pairs.

With ``rkl`` (f′(t) = log t + 1) this is DPO exactly. Valid here: rkl, fkl (f′ = −1/t), js
(f′ = ½ log(2t/(1+t)): the library's JS is half of TRL's, so TRL's js at β equals ours at 2β), and
alpha with α < 1 (f′ = (t^{α−1} − 1)/(α−1), TRL's ``alpha_divergence`` formula). Refused: tv (f′ is a
step, not invertible) and chi2 / alpha ≥ 1 in this convention (f′(0) is finite: the optimum may put
π = 0 where π_ref > 0 and the multiplier of that constraint does not cancel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .divergences import Divergence, get_divergence

__all__ = ["f_dpo_loss", "f_dpo_margin", "check_f_dpo_divergence", "implicit_reward", "bradley_terry_loss", "pairwise_nll"]


def pairwise_nll(logits: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(m_i) over the pairs' preference logits m_i (the loss of every pairwise objective here)."""
    return -F.logsigmoid(logits).mean()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean −log σ(r_w − r_l − m): the negative log-likelihood of the Bradley–Terry model
    P(y_w ≻ y_l) = σ(r(y_w) − r(y_l)), with an optional margin m ≥ 0 per pair (Llama 2's reward model).
    Its minimiser is r up to an additive constant per prompt."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must be 1-D of one length, got {tuple(chosen_rewards.shape)} "
                         f"and {tuple(rejected_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return pairwise_nll(diff)


def check_f_dpo_divergence(divergence: str | Divergence) -> Divergence:
    """The divergence object, or ``ValueError`` when its f′ does not give a valid implicit reward
    (f′ must tend to −∞ at t → 0 and increase strictly)."""
    div = get_divergence(divergence)
    at_zero = div.f_prime(torch.tensor([-torch.inf], dtype=torch.float64))
    grid = div.f_prime(torch.linspace(-20.0, 20.0, 401, dtype=torch.float64))
    if not bool(torch.isneginf(at_zero).all()):
        raise ValueError(f"f-DPO needs f′(t) → −∞ as t → 0; {div!r} has f′(0) = {float(at_zero[0]):g}: its optimum may set "
                         f"π = 0 where π_ref > 0 and the implicit reward is not valid (use rkl, fkl, js or alpha < 1)")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"f-DPO needs a strictly increasing f′ (strictly convex f) to invert; {div!r} does not have one")
    return div


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, divergence: str | Divergence,
                    beta: float) -> torch.Tensor:
    """r̂ = β f′(π(y|x)/π_ref(y|x)) from sequence log-probs (up to the per-prompt constant λ(x))."""
    div = check_f_dpo_divergence(divergence)
    return beta * div.f_prime(policy_logps - ref_logps)


def f_dpo_margin(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                 divergence: str | Divergence = "rkl", beta: float = 0.1) -> torch.Tensor:
    """[B] implicit-reward margins r̂_w − r̂_l, r̂ = β f′(π/π_ref) (sequence log-probs [B] each); > 0 where
    the policy ranks the pair as the data does."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-prob tensors must be 1-D of one length, got shapes {sorted(shapes)}")
    margin = (implicit_reward(policy_chosen_logps, ref_chosen_logps, divergence, beta)
              - implicit_reward(policy_rejected_logps, ref_rejected_logps, divergence, beta))
    if not bool(torch.isfinite(margin.detach()).all()):
        raise ValueError("f_dpo_loss: a non-finite implicit-reward margin (a log-prob of −inf or NaN in the inputs)")
    return margin


def f_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               divergence: str | Divergence = "rkl", beta: float = 0.1) -> torch.Tensor:
    """Mean over pairs of −log σ(r̂_w − r̂_l), r̂ = β f′(π/π_ref) (sequence log-probs [B] each; the same
    tensors as TRL's DPOTrainer). ``rkl`` gives DPO's sigmoid loss."""
    return pairwise_nll(f_dpo_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     divergence, beta))
