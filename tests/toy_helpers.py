"""Shared helpers for the exact-toy tests: Monte-Carlo gradients of f_dpg_loss vs exact ∇D."""

from __future__ import annotations

import math

import torch

from fdiv_align import f_dpg_loss, get_baseline
from fdiv_align.testing.toy import ToyAR


def sequence_index(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Row of x in ToyAR.all_sequences() (lexicographic)."""
    powers = vocab_size ** torch.arange(x.shape[1] - 1, -1, -1)
    return (x * powers).sum(-1)


def log_prob_jacobian(policy: ToyAR, sequences: torch.Tensor) -> torch.Tensor:
    """J[s, k] = ∂ log π(sequence s)/∂θ_k, exact, by autograd."""
    theta = policy.logits.detach()
    def logprob(theta_):
        x = sequences
        prev = torch.cat([torch.full_like(x[:, :1], policy.vocab_size), x[:, :-1]], dim=1)
        logp = torch.log_softmax(theta_, dim=-1)
        pos = torch.arange(policy.length).expand_as(x)
        return logp[pos, prev, x].sum(-1)
    return torch.autograd.functional.jacobian(logprob, theta, vectorize=True).reshape(len(sequences), -1)


def monte_carlo_gradients(problem, policy: ToyAR, proposal: ToyAR | None, divergence, baseline: str | None,
                          n_batches: int, batch_size: int, seed: int, log_z_shift: float = 0.0,
                          log_p_floor=None) -> torch.Tensor:
    """∇θ f_dpg_loss for n_batches independent batches, [n_batches, n_params].

    The loss is called exactly as a user would (policy log-probs with grad); its gradient with
    respect to log π of every sequence is chained with the exact Jacobian of log π.
    """
    seqs = problem.sequences
    J = log_prob_jacobian(policy, seqs)
    lp_all = policy.log_prob(seqs).detach().requires_grad_(True)
    q = proposal if proposal is not None else policy
    g = torch.Generator().manual_seed(seed)
    x, log_q = q.sample(n_batches * batch_size, generator=g)
    idx = sequence_index(x, policy.vocab_size).view(n_batches, batch_size)
    log_q = log_q.view(n_batches, batch_size)
    log_P_all = problem.target_logscores(seqs)
    base = get_baseline(baseline, divergence=divergence)
    grads = torch.empty(n_batches, J.shape[1], dtype=torch.float64)
    log_z = problem.log_z + log_z_shift
    for b in range(n_batches):
        i = idx[b]
        lp = lp_all[i]
        proposal_lp = lp.detach() if proposal is None else log_q[b]
        out = f_dpg_loss(lp, proposal_lp, log_P_all[i], divergence, log_z, baseline=base, log_p_floor=log_p_floor)
        (d,) = torch.autograd.grad(out.loss, lp_all)
        grads[b] = d @ J
    return grads


def exact_gradient(problem, policy: ToyAR, divergence) -> torch.Tensor:
    policy.zero_grad()
    d = problem.exact_divergence(divergence, policy)
    d.backward()
    out = policy.logits.grad.detach().flatten().clone()
    policy.zero_grad()
    return out


def unbiasedness_report(grads: torch.Tensor, exact: torch.Tensor) -> dict:
    """Per-coordinate z-scores of the mean gradient and the relative error of the mean."""
    n = grads.shape[0]
    mean = grads.mean(0)
    se = grads.std(0, unbiased=True) / math.sqrt(n)
    varying = se > 1e-12
    z = torch.zeros_like(mean)
    z[varying] = (mean[varying] - exact[varying]) / se[varying]
    # coordinates with no sampling variance: relative to the gradient's scale (rounding, not noise)
    const_err = float((mean[~varying] - exact[~varying]).abs().max() / exact.abs().max()) if (~varying).any() else 0.0
    return {
        "max_abs_z": float(z.abs().max()),
        "const_err": const_err,
        "rel_err": float((mean - exact).norm() / exact.norm()),
        "rel_se": float(se.norm() / exact.norm()),
    }
