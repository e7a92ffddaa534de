"""A tiny autoregressive model whose every sequence can be enumerated, and exact targets on it.

:class:`ToyAR` generates fixed-length sequences x = (x_1..x_T) over a vocabulary of V tokens:
π(x) = Π_t softmax(W[t, x_{t−1}])[x_t] (x_0 = BOS). With V = 4 and T = 5 there are 1,024
sequences, so π, any target p = P/Z, every f-divergence and its exact gradient (autograd
through :func:`fdiv_align.objectives.divergences.exact_divergence`) are computed by enumeration.

:class:`ToyProblem` holds a base model a and a target log-score log P(x) = log a(x) + log Φ(x)
(pointwise, exponential/reward), with the exact log Z and p.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..objectives.divergences import exact_divergence

__all__ = ["ToyAR", "ToyProblem", "pointwise_problem", "exponential_problem", "reward_problem", "minimise",
           "enumerable_lm", "enumeration_batch", "exact_trainer_divergences", "enumerate_logprobs"]


class ToyAR(nn.Module):
    """Position-dependent bigram model: logits W[t, previous token] (BOS = index V)."""

    def __init__(self, vocab_size: int = 4, length: int = 5, seed: int = 0, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64, unigram: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.length = length
        self.unigram = unigram  # a misspecified family: i.i.d. tokens, one shared logit vector
        shape = (1, 1, vocab_size) if unigram else (length, vocab_size + 1, vocab_size)
        self.logits = nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=dtype))

    def _table(self) -> torch.Tensor:
        """[T, V+1, V] log π(x_t = · | t, x_{t−1})."""
        logp = torch.log_softmax(self.logits, dim=-1)
        return logp.expand(self.length, self.vocab_size + 1, self.vocab_size) if self.unigram else logp

    def all_sequences(self) -> torch.Tensor:
        """Every sequence, [V^T, T] (lexicographic order)."""
        return torch.tensor(list(itertools.product(range(self.vocab_size), repeat=self.length)), dtype=torch.long)

    def token_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T] log π(x_t | x_<t)."""
        prev = torch.cat([torch.full_like(x[:, :1], self.vocab_size), x[:, :-1]], dim=1)
        logp = self._table()  # [T, V+1, V]
        pos = torch.arange(self.length).expand_as(x)
        return logp[pos, prev, x]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[N] log π(x)."""
        return self.token_log_probs(x).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n ancestral samples and their log-probabilities recorded while sampling."""
        x = torch.empty(n, self.length, dtype=torch.long)
        logq = torch.zeros(n, dtype=self.logits.dtype)
        prev = torch.full((n,), self.vocab_size, dtype=torch.long)
        logp_all = self._table()
        for t in range(self.length):
            lp = logp_all[t, prev]
            tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)
            logq += lp.gather(1, tok[:, None]).squeeze(1)
            x[:, t] = tok
            prev = tok
        return x, logq


@dataclass
class ToyProblem:
    """A base model a, a target log-score function and the enumeration needed for exact values."""

    base: ToyAR
    log_phi: Callable[[torch.Tensor], torch.Tensor]  # [N, T] → [N] log Φ(x) (−inf allowed)
    name: str = "toy"

    def __post_init__(self):
        self.sequences = self.base.all_sequences()
        with torch.no_grad():
            self._log_P_all = self.target_logscores(self.sequences)
        self.log_z = float(torch.logsumexp(self._log_P_all, 0))
        self.log_p_all = self._log_P_all - self.log_z

    def target_logscores(self, x: torch.Tensor) -> torch.Tensor:
        """log P(x) = log a(x) + log Φ(x)."""
        with torch.no_grad():
            return self.base.log_prob(x) + self.log_phi(x)

    def exact_divergence(self, divergence, policy: ToyAR) -> torch.Tensor:
        """D_f(π‖p) by enumeration, differentiable in the policy's parameters."""
        return exact_divergence(divergence, policy.log_prob(self.sequences), self.log_p_all)

    def exact_expectation(self, policy: ToyAR, values: torch.Tensor) -> float:
        """E_π[values(x)] over the enumeration (values given for every sequence)."""
        with torch.no_grad():
            return float((policy.log_prob(self.sequences).exp() * values).sum())


def pointwise_problem(base: ToyAR, token: int = 0, min_count: int = 2) -> ToyProblem:
    """b(x) = [x contains ``token`` at least ``min_count`` times]: P = a·b has zeros."""
    return ToyProblem(base, lambda x: torch.where((x == token).sum(-1) >= min_count, 0.0, -math.inf).to(torch.float64),
                      name=f"pointwise(token {token} ≥ {min_count}×)")


def _token_count_feature(x: torch.Tensor, token: int) -> torch.Tensor:
    return (x == token).sum(-1).to(torch.float64)


def exponential_problem(base: ToyAR, token: int = 0, lam: float = 1.0) -> ToyProblem:
    """P = a·exp(λ·φ), φ(x) = number of ``token`` in x (full support)."""
    return ToyProblem(base, lambda x: lam * _token_count_feature(x, token), name=f"exponential(λ={lam})")


def reward_problem(base: ToyAR, reward: Callable[[torch.Tensor], torch.Tensor], beta: float) -> ToyProblem:
    """P = a·exp(r/β): the RLHF target."""
    return ToyProblem(base, lambda x: reward(x).to(torch.float64) / beta, name=f"reward(β={beta})")


def minimise(problem: ToyProblem, divergence, steps: int = 200, batch_size: int = 64, lr: float = 0.1,
             seed: int = 0, baseline: str | None = "loo", log_p_floor: float | None = None,
             policy: ToyAR | None = None, measure=("fkl", "rkl", "js", "tv")) -> dict:
    """Plain on-policy f-DPG loop on a toy problem (policy initialised at the base model).

    Uses :class:`fdiv_align.FDivergenceLoss` (log Ẑ accumulated from the samples) and Adam. Returns
    the exact divergences named in ``measure`` before and after, and the exact training curve of
    the optimised divergence.
    """
    from ..objectives.loss import FDivergenceLoss

    torch.manual_seed(seed)
    if policy is None:
        policy = ToyAR(problem.base.vocab_size, problem.base.length)
        with torch.no_grad():
            policy.logits.copy_(problem.base.logits)
    else:
        policy = copy.deepcopy(policy)
    loss_fn = FDivergenceLoss(divergence, baseline=baseline, log_p_floor=log_p_floor)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def exact_all():
        with torch.no_grad():
            return {m: float(problem.exact_divergence(m, policy)) for m in measure}

    before = exact_all()
    curve = []
    for _ in range(steps):
        x, log_q = policy.sample(batch_size, generator=g)
        out = loss_fn(policy.log_prob(x), log_q, problem.target_logscores(x))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            curve.append(float(problem.exact_divergence(loss_fn.divergence, policy)))
    return {"before": before, "after": exact_all(), "curve": curve, "policy": policy}


# ----------------------------------------------------------------------------- an enumerable HF LM


def enumerable_lm(seed: int = 0, words=("a", "b", "c"), length: int = 3, logit_scale: float = 3.0):
    """A tiny HF Llama over ``words`` + 4 specials, generating exactly ``length`` tokens (no EOS stop):
    (4 + len(words))^length sequences, all enumerable. Returns (LoadedModel, all_sequences [S, length])."""
    from ..lm.models import tiny_model

    lm = tiny_model(seed=seed, hidden_size=16, num_layers=1, words=list(words), logit_scale=logit_scale)
    V = len(lm.tokenizer)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=length)), dtype=torch.long)
    return lm, seqs


def enumeration_batch(tokenizer, sequences: torch.Tensor, context: str = ""):
    """A :class:`fdiv_align.lm.sampling.Batch` holding every sequence after one context."""
    from ..lm.batch import Batch, encode_contexts

    S, T = sequences.shape
    prompt = torch.tensor(encode_contexts(tokenizer, [context])[0]).expand(S, -1).clone()
    mask = torch.ones(S, T, dtype=torch.long)
    texts = tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=True)
    return Batch(torch.zeros(S, dtype=torch.long), [context], prompt, torch.ones_like(prompt), sequences.clone(), mask, None, texts)


def exact_trainer_divergences(trainer, batch, measure=("fkl", "rkl", "js", "tv")) -> dict:
    """Exact D(π‖p) for a :class:`fdiv_align.Trainer` whose sample space is ``batch`` (every sequence)."""
    with torch.no_grad():
        log_pi = trainer.policy.policy_logprobs(batch).double().cpu()
        log_P = trainer.target.log_scores(batch, trainer.policy.reference_logprobs(batch)).log_P
    log_p = log_P - torch.logsumexp(log_P, 0)
    return {m: float(exact_divergence(m, log_pi, log_p)) for m in measure}


@torch.no_grad()
def enumerate_logprobs(model, tokenizer, length: int, context: str = "", rows_per_pass: int = 8192) -> torch.Tensor:
    """[V^length] float64 log π(x | context) of every continuation x of exactly ``length`` tokens, in
    base-V order (index = Σ_t x_t·V^(length−1−t), as :func:`itertools.product` lists them).

    One forward pass over the V^(length−1) prefixes gives every next-token distribution: row r (prefix
    x_1..x_{T−1} after [BOS]+context) predicts x_{t+1} at position t, so
    log π(x) = Σ_{t<T−1} log π(x_{t+1} | x_≤t) + log π(x_T | x_<T) — V times fewer tokens than scoring
    each sequence (fp32 log-softmax of fp32 logits, like the sampler; tests/test_paper_exact.py checks
    it against :func:`fdiv_align.lm.scoring.score` of every sequence)."""
    from ..lm.batch import encode_contexts
    from ..lm.logprobs import log_softmax_fp32

    V = model.get_output_embeddings().weight.shape[0]
    prompt = torch.tensor(encode_contexts(tokenizer, [context])[0])
    if length < 1:
        raise ValueError(f"length must be ≥ 1, got {length}")
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=length - 1)), dtype=torch.long).view(V ** (length - 1), length - 1)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prefixes), rows_per_pass):
        rows = prefixes[i:i + rows_per_pass]
        ids = torch.cat([prompt.expand(len(rows), -1), rows], 1).to(device)
        logits = model(input_ids=ids).logits[:, len(prompt) - 1:].float()  # [R, length, V]: predicts x_1 … x_T
        lp = log_softmax_fp32(logits).double().cpu()
        seen = lp[:, :-1].gather(2, rows[:, :, None]).squeeze(2).sum(1)  # log π(x_1 … x_{T−1})
        out.append((seen[:, None] + lp[:, -1]).reshape(-1))  # × every last token
    return torch.cat(out)
