"""Exact tasks for the paper's claims (benchmarks/paper_exact.py, tests/test_paper_exact.py): a trained tiny
transformer over a small vocabulary whose every continuation is enumerated, so that Z, p and every metric
of a policy are exact (:func:`fdiv_align.testing.toy.enumerate_logprobs`, renormalised over the enumeration).

Tasks (the paper's four families), with P(x|c) = a(x|c)·Φ(x, c):
  pointwise       Φ = [the word "cat" occurs ≥ 2 times]
  distributional  Φ = exp(λ·[the word "red" occurs]), λ fitted exactly on the enumeration so that E_p = 0.8
  reward          Φ = exp(r/β), r = (number of "runs")/T, β = 0.1  (RLHF's target)
  conditional     contexts "red", "blue", "cat"; Φ = [the context word occurs in the continuation]
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import tempfile
import time
from pathlib import Path

import torch

from ..files import atomic_path

__all__ = ["WORDS", "LENGTH", "BATCH", "DIVERGENCES", "TASKS", "FLOOR", "DIST_TARGET", "REWARD_BETA", "METRICS",
           "base_model", "weights_fingerprint", "ExactTask", "run_cell", "qrs_check"]

#: the benchmark's vocabulary (6 words + 4 special tokens: V = 10) and continuation length (10⁵ sequences)
WORDS = ["red", "blue", "cat", "dog", "runs", "sleeps"]
LENGTH = 5
BATCH = 64  # samples per training step
DIVERGENCES = {"rkl": {}, "fkl": {}, "js": {}, "tv": {}, "alpha": {"alpha": 0.5}, "chi2": {}}
TASKS = ("pointwise", "distributional", "reward", "conditional")
FLOOR = -10.0  # divergence.log_phi_floor for rkl/chi2 on targets with zeros
DIST_TARGET = 0.8  # E_p[red occurs]
REWARD_BETA = 0.1
METRICS = ("kl_p_pi", "kl_pi_p", "js", "tv", "alpha", "chi2", "alignment", "entropy", "kl_pi_a")


def base_model(words=WORDS, length: int = LENGTH, steps: int = 400, cache: Path | None = None):
    """The trained base a (a LoadedModel): a 2-layer Llama (hidden 32) trained by maximum likelihood on a
    seeded first-order Markov chain over ``words`` (Dirichlet(0.4) transitions), ``steps`` Adam steps of 256
    sequences. Deterministic given the arguments on one CPU kind (:func:`weights_fingerprint` tells two
    apart); cached under ``cache`` when given."""
    from ..lm.models import tiny_model

    lm = tiny_model(seed=0, hidden_size=32, num_layers=2, words=list(words), logit_scale=1.0)
    path = None if cache is None else Path(cache) / f"base-{len(words)}w-{'-'.join(words)}-T{length}-{steps}steps.pt"
    if path is not None and path.exists():
        lm.model.load_state_dict(torch.load(path, weights_only=True))
        return lm
    g = torch.Generator().manual_seed(0)
    transitions = torch.distributions.Dirichlet(torch.full((len(words),), 0.4)).sample((len(words) + 1,))
    word_ids = torch.tensor([lm.tokenizer.convert_tokens_to_ids(w) for w in words])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, bos = lm.model, lm.tokenizer.bos_token_id
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            x = torch.empty(256, length, dtype=torch.long)
            prev = torch.full((256,), len(words))
            for t in range(length):
                prev = torch.multinomial(transitions[prev], 1, generator=g).squeeze(1)
                x[:, t] = prev
            ids = torch.cat([torch.full((256, 1), bos), word_ids[x]], 1)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return lm


def weights_fingerprint(model) -> str:
    """The first 16 hex digits of the SHA-256 of a model's weights (names and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _count(text: str, word: str) -> int:
    return text.split().count(word)


class ExactTask:
    """A task of the benchmark: the library Task the trainer runs, and per context the exact log P,
    log p and the alignment values of every sequence."""

    def __init__(self, name: str, lm, length: int = LENGTH, words=WORDS):
        from ..targets import BooleanScorer, RewardScorer
        from ..targets.distributional import fit_lambda
        from ..targets.tasks import Task
        from .toy import enumerate_logprobs

        V = len(lm.tokenizer)
        seqs = torch.tensor(list(itertools.product(range(V), repeat=length)))
        self.texts = lm.tokenizer.batch_decode(seqs.tolist(), skip_special_tokens=True)
        contexts = ["red", "blue", "cat"] if name == "conditional" else [""]
        self.log_a = [enumerate_logprobs(lm.model, lm.tokenizer, length, c) for c in contexts]
        self.log_a = [la - torch.logsumexp(la, 0) for la in self.log_a]
        w0, w1, w2 = words[2], words[0], words[4]  # cat (pointwise), red (distributional), runs (reward)
        if name == "pointwise":
            scorer = BooleanScorer(lambda t, c: _count(t, w0) >= 2, name=f"two_{w0}")
            values = [torch.tensor([float(_count(t, w0) >= 2) for t in self.texts], dtype=torch.float64)]
        elif name == "distributional":
            phi = torch.tensor([float(_count(t, w1) >= 1) for t in self.texts], dtype=torch.float64)
            fit = fit_lambda(phi, [DIST_TARGET], log_a=self.log_a[0], log_q=torch.zeros_like(phi))  # weights ∝ a e^{λφ}: exact
            lam = float(fit.lambdas[0])
            scorer = RewardScorer(lambda ts, cs: [lam * float(_count(t, w1) >= 1) for t in ts], beta=1.0, name=f"has_{w1}")
            values = [phi]
            self.lam = lam
        elif name == "reward":
            beta = REWARD_BETA
            r = torch.tensor([_count(t, w2) / length for t in self.texts], dtype=torch.float64)
            scorer = RewardScorer(lambda ts, cs: [_count(t, w2) / length for t in ts], beta=beta, name=f"{w2}_rate")
            values = [r]
        elif name == "conditional":
            scorer = BooleanScorer(lambda t, c: _count(t, c) >= 1, name="context_word")
            values = [torch.tensor([float(_count(t, c) >= 1) for t in self.texts], dtype=torch.float64) for c in contexts]
        else:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
        self.name, self.contexts, self.values = name, contexts, values
        self.task = Task(name, scorer, contexts=contexts, max_new_tokens=length)
        self.log_P = []
        for c, la in zip(contexts, self.log_a):
            log_phi = scorer.log_scores(self.texts, [c] * len(self.texts)).double()
            self.log_P.append(la + log_phi)
        self.log_p = [lP - torch.logsumexp(lP, 0) for lP in self.log_P]
        self.has_zeros = any(bool(torch.isneginf(lP).any()) for lP in self.log_P)
        # the target the trainer optimises: log Φ floored at FLOOR for rkl/chi2 when P has zeros (p_ε)
        self.log_p_floored = [self._floored(lP, la) for lP, la in zip(self.log_P, self.log_a)]

    @staticmethod
    def _floored(log_P, log_a):
        lP = torch.maximum(log_P, log_a + FLOOR)
        return lP - torch.logsumexp(lP, 0)

    def exact_metrics(self, model, tokenizer, length: int = LENGTH) -> dict:
        """Every metric of the policy ``model``, exact, averaged over the contexts."""
        from ..objectives.divergences import exact_divergence
        from .toy import enumerate_logprobs

        acc = {m: 0.0 for m in METRICS}
        for i, c in enumerate(self.contexts):
            lp_pi = enumerate_logprobs(model, tokenizer, length, c)
            lp_pi = lp_pi - torch.logsumexp(lp_pi, 0)
            pi = lp_pi.exp()
            m = {"kl_p_pi": exact_divergence("fkl", lp_pi, self.log_p[i]), "kl_pi_p": exact_divergence("rkl", lp_pi, self.log_p[i]),
                 "js": exact_divergence("js", lp_pi, self.log_p[i]), "tv": exact_divergence("tv", lp_pi, self.log_p[i]),
                 "alpha": exact_divergence(_alpha(), lp_pi, self.log_p[i]), "chi2": exact_divergence("chi2", lp_pi, self.log_p[i]),
                 "alignment": (pi * self.values[i]).sum(), "entropy": -(pi * lp_pi).sum(),
                 "kl_pi_a": exact_divergence("rkl", lp_pi, self.log_a[i])}
            for k, v in m.items():
                acc[k] += float(v) / len(self.contexts)
        return acc

    def objective(self, model, tokenizer, divergence: str, length: int = LENGTH) -> float:
        """D_f(π‖p_train), exact: the divergence the run minimised, towards the floored p_ε where it uses one."""
        from ..objectives.divergences import exact_divergence
        from .toy import enumerate_logprobs

        total = 0.0
        targets = self.log_p_floored if self.uses_floor(divergence) else self.log_p
        for c, lp in zip(self.contexts, targets):
            lp_pi = enumerate_logprobs(model, tokenizer, length, c)
            total += float(exact_divergence(_divergence(divergence), lp_pi - torch.logsumexp(lp_pi, 0), lp)) / len(self.contexts)
        return total

    def target_metrics(self) -> dict:
        """alignment and entropy of p itself (the 'target p' row)."""
        out = {"alignment": 0.0, "entropy": 0.0}
        for lp, v in zip(self.log_p, self.values):
            p = lp.exp()
            out["alignment"] += float((p * v).sum()) / len(self.contexts)
            out["entropy"] += float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum()) / len(self.contexts)
        return out

    def uses_floor(self, divergence: str) -> bool:
        from ..objectives.divergences import get_divergence

        return self.has_zeros and not get_divergence(_divergence(divergence)).finite_where_target_is_zero


def _alpha():
    from ..objectives.divergences import get_divergence

    return get_divergence("alpha", alpha=0.5)


def _divergence(name: str):
    from ..objectives.divergences import get_divergence

    return get_divergence(name, **DIVERGENCES[name])


def run_cell(task_name: str, divergence: str, seed: int, lr: float, budget: int, curve, words=WORDS,
             length: int = LENGTH, base_steps: int = 400, cache: Path | None = None) -> dict:
    """One run: the whole policy (started at the base a) fine-tuned by the library's Trainer towards
    ``task_name``'s target with ``divergence`` (on-policy, leave-one-out baseline, Adam, BATCH samples per
    step) for ``budget`` samples; exact metrics at each point of ``curve`` (samples seen) and the exact
    final value of the run's own objective D_f(π‖p_train)."""
    from ..config import from_dict
    from ..training.trainer import Trainer

    torch.set_num_threads(1)
    lm = base_model(words, length, base_steps, cache)
    task = ExactTask(task_name, lm, length, words)
    steps = math.ceil(budget / BATCH)
    cfg = from_dict({
        "model": {"name": "tiny", "lora": False, "device": "cpu"},
        "divergence": {"name": divergence, "params": DIVERGENCES[divergence],
                       "log_phi_floor": FLOOR if task.uses_floor(divergence) else None},
        "task": {"max_new_tokens": length},
        "trainer": {"steps": steps, "samples_per_step": BATCH, "micro_batch_size": BATCH, "lr": lr, "seed": seed,
                    "eval_every": 0, "eval_samples": 8, "checkpoint_every": 0, "stop_at_eos": False,
                    "precision": "fp32", "compile": False, "threads": 1},
        "logger": {"progress": False, "jsonl": False}})
    points = [c for c in curve if c <= budget]
    curve_rows = []
    policy_lm = copy.deepcopy(lm)
    t0 = time.perf_counter()

    def on_step(trainer, step, record):
        seen = trainer.samples_seen
        while points and seen >= points[0]:
            curve_rows.append({"point": points.pop(0), "samples": seen, **task.exact_metrics(trainer.policy.model, lm.tokenizer, length)})

    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, lm=policy_lm, task=task.task, output_dir=Path(d) / "run", callbacks=[on_step])
        if points and points[0] == 0:
            curve_rows.append({"point": points.pop(0), "samples": 0, **task.exact_metrics(trainer.policy.model, lm.tokenizer, length)})
        trainer.train()
        objective = task.objective(trainer.policy.model, lm.tokenizer, divergence, length)
        trainer_class = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    return {"task": task_name, "divergence": divergence, "seed": seed, "lr": lr, "budget": budget, "steps": steps,
            "curve": curve_rows, "objective": objective, "trainer": trainer_class, "floor": task.uses_floor(divergence),
            "seconds": time.perf_counter() - t0}


def qrs_check(task_name: str, n_accept: int = 10_000, words=WORDS, length: int = LENGTH, base_steps: int = 400,
              max_proposals: int = 1_000_000, cache: Path | None = None) -> dict:
    """Quasi-rejection sampling of p with the base a as proposal (the library's sampler, log q as
    recorded), β = max_x P(x)/a(x)·e^{−k} with the smallest whole k ≥ 0 whose exact acceptance rate
    reaches ``n_accept`` within ``max_proposals`` (k = 0: p_β = p exactly); draws until ``n_accept``
    samples are accepted, then Pearson's chi-square of their histogram against the exact p_β (and p),
    the acceptance count against the exact rate, and the exact TV(p, p_β) against its bound (first
    context)."""
    from ..objectives.qrs import chi_square_pvalue, qrs_accept, qrs_estimates, qrs_exact
    from ..lm.sampling import sample

    torch.set_num_threads(1)
    lm = base_model(words, length, base_steps, cache)
    task = ExactTask(task_name, lm, length, words)
    log_P, log_a, context = task.log_P[0], task.log_a[0], task.contexts[0]
    max_log_ratio = float((log_P - log_a)[torch.isfinite(log_P)].max())
    clip = 0
    while qrs_exact(log_P, log_a, max_log_ratio - clip).acceptance_rate * max_proposals < n_accept:
        clip += 1
    log_beta = max_log_ratio - clip
    exact = qrs_exact(log_P, log_a, log_beta)
    V = len(lm.tokenizer)
    place = V ** torch.arange(length - 1, -1, -1)
    g = torch.Generator().manual_seed(2024)
    counts = torch.zeros(V ** length, dtype=torch.long)
    drawn, all_log_P, all_log_q = 0, [], []
    t0 = time.perf_counter()
    while int(counts.sum()) < n_accept:
        batch = sample(lm.model, lm.tokenizer, [context], 8192, length, stop_at_eos=False, generator=g)
        index = (batch.tokens * place).sum(-1)
        lp, lq = log_P[index], batch.logq.double()
        accepted = qrs_accept(lp, lq, log_beta, torch.rand(len(lp), generator=g, dtype=torch.float64))
        counts += torch.bincount(index[accepted], minlength=V ** length)
        drawn += len(lp)
        all_log_P.append(lp)
        all_log_q.append(lq)
    k = int(counts.sum())
    se = math.sqrt(drawn * exact.acceptance_rate * (1 - exact.acceptance_rate))
    est = qrs_estimates(torch.cat(all_log_P), torch.cat(all_log_q), log_beta)
    return {"task": task_name, "context": context, "proposals": drawn, "accepted": k, "log_beta": log_beta, "clip_nats": clip,
            "tv_exact": exact.tv, "chi2_pvalue_vs_p": chi_square_pvalue(counts, task.log_p[0].exp()),
            "acceptance_exact": exact.acceptance_rate, "acceptance_empirical": k / drawn,
            "acceptance_z": (k - drawn * exact.acceptance_rate) / se, "acceptance_estimate": est.acceptance_rate,
            "tv_bound_exact": exact.tv_bound, "tv_bound_estimate": est.tv_bound,
            "chi2_pvalue": chi_square_pvalue(counts, exact.log_p_beta.exp()),
            "chi2_pvalue_vs_base": chi_square_pvalue(counts, log_a.exp()),
            "target": task.target_metrics(), "qrs_alignment": float((counts.double() * task.values[0]).sum() / k),
            "seconds": time.perf_counter() - t0}
