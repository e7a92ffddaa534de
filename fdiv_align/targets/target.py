"""Targets P(x|c) = a(x|c)·Φ(x,c): a base LM times scorers (``BaseLM(model, tok) * scorer * scorer``).

All values are log-scores: log P = log a + Σ_i log Φ_i (−∞ where a boolean scorer is 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import read_lines
from ..lm.batch import Batch
from ..objectives.divergences import floored_log_target
from ..lm.logprobs import SamplingConfig
from ..lm.scoring import score
from .distributional import DistributionalConstraint
from .scorers import ProductScorer, Scorer

__all__ = ["BaseLM", "Target", "TargetScores", "load_contexts"]


class BaseLM:
    """a(x|c): the reference LM. Scores continuation tokens with the library's one layout.

    ``BaseLM(model, tokenizer)`` scores with ``model`` as it is; inside the trainer a comes from
    :meth:`BaseLM.of_policy`, whose ``logprobs`` is the policy's reference pass (adapters disabled or
    the frozen copy) — never the adapted policy itself."""

    def __init__(self, model, tokenizer, config: SamplingConfig = SamplingConfig(), logprobs=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._logprobs = logprobs

    @classmethod
    def of_policy(cls, policy) -> "BaseLM":
        """a of a :class:`~fdiv_align.lm.policy.Policy`, scoring through its
        :meth:`~fdiv_align.lm.policy.Policy.reference_logprobs` (the library's one log a)."""
        return cls(policy.model, policy.tokenizer, logprobs=policy.reference_logprobs)

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[N] log a(x|c) (float64)."""
        if self._logprobs is not None:
            return self._logprobs(batch).double().cpu()
        return score(self.model, batch, self.config, pad_id=self.tokenizer.pad_token_id)[1].double().cpu()

    def __mul__(self, scorer: Scorer) -> "Target":
        if not isinstance(scorer, Scorer):
            return NotImplemented
        return Target(self, scorer)


@dataclass
class TargetScores:
    log_a: torch.Tensor  # [N] base log-probabilities
    log_phi: torch.Tensor  # [N] Σ scorer log-scores
    components: dict  # scorer name → [N] log-scores

    alignment: torch.Tensor | None = None  # [N] the first scorer's alignment quantity (b, r or φ)

    @property
    def log_P(self) -> torch.Tensor:
        return self.log_a + self.log_phi

    def floored_log_P(self, floor: float | None) -> torch.Tensor:
        """log a + max(log Φ, floor) (:func:`~fdiv_align.objectives.divergences.floored_log_target`);
        ``floor=None``: log P itself."""
        return floored_log_target(self.log_a, self.log_phi, floor)


class Target:
    """P = a·Φ_1·…·Φ_k."""

    def __init__(self, base: BaseLM, scorer: Scorer):
        self.base = base
        self.scorer = scorer if isinstance(scorer, ProductScorer) else ProductScorer([scorer])

    def __mul__(self, scorer: Scorer) -> "Target":
        if not isinstance(scorer, Scorer):
            return NotImplemented
        return Target(self.base, ProductScorer([self.scorer, scorer]))

    @property
    def scorers(self) -> list[Scorer]:
        return self.scorer.scorers

    @property
    def constraints(self) -> list[DistributionalConstraint]:
        return [s for s in self.scorers if isinstance(s, DistributionalConstraint)]

    def log_scores(self, batch: Batch, base_logprobs: torch.Tensor | None = None) -> TargetScores:
        """log a (computed unless given), each scorer's log-score and log P for a batch."""
        log_a = self.base.logprobs(batch) if base_logprobs is None else base_logprobs.detach().double().cpu()
        contexts = batch.context_texts
        comps = self.scorer.components(batch.texts, contexts)
        log_phi = torch.stack(list(comps.values())).sum(0) if comps else torch.zeros(len(batch), dtype=torch.float64)
        first = self.scorers[0]
        alignment = first.alignment_from_log_scores(next(iter(comps.values())), batch.texts, contexts).double()
        return TargetScores(log_a, log_phi, comps, alignment)

    def alignment(self, batch: Batch) -> torch.Tensor:
        """The first scorer's alignment quantity (b, r or φ) per sample."""
        return self.scorers[0].alignment(batch.texts, batch.context_texts)


PROMPT_COLUMNS = ("prompt", "context", "text", "messages")


def load_contexts(source, column: str | None = None) -> list:
    """Contexts from a list, a text file (one per line), a JSONL file or a ``datasets`` directory
    (``save_to_disk``): the ``column`` of each row (None: the first of :data:`PROMPT_COLUMNS` present).
    A context is a string, or a conversation — a list of ``{"role", "content"}`` messages — that
    :func:`fdiv_align.lm.batch.render_contexts` renders with the tokenizer's chat template."""
    if isinstance(source, (list, tuple)):
        contexts = list(source)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"contexts file {path} does not exist")
        if path.is_dir():
            contexts = _dataset_column(path, column)
        elif path.suffix == ".jsonl":
            contexts = []
            for n, line in enumerate(read_lines(path), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                contexts.append(_prompt_of(row, column, f"{path}:{n}"))
        else:
            contexts = [line for line in read_lines(path) if line.strip()]
    if not contexts:
        raise ValueError(f"no contexts in {source!r}")
    for i, c in enumerate(contexts):
        _check_context(c, f"context {i}")
    return contexts


def _dataset_column(path: Path, column: str | None) -> list:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"contexts {path} is a directory (a `datasets` dataset?), which needs the datasets package: "
                          f"pip install 'fdiv_align[train]'") from None
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"contexts {path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"contexts {path}: a DatasetDict without a 'train' split (splits: {sorted(data)})")
        data = data["train"]
    return [_prompt_of(row, column, f"{path} row {i}") for i, row in enumerate(data)]


def _prompt_of(row: dict, column: str | None, where: str):
    key = column if column is not None else next((k for k in PROMPT_COLUMNS if k in row), None)
    if key is None or key not in row:
        wanted = repr(column) if column is not None else f"none of {'/'.join(PROMPT_COLUMNS)}"
        raise ValueError(f"{where}: the row has {wanted} (columns: {sorted(row)}); set task.prompt_column")
    return row[key]


def _check_context(c, where: str) -> None:
    if isinstance(c, str):
        return
    if isinstance(c, list) and c and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in c):
        return
    raise ValueError(f"{where}: a context is a string or a list of {{'role', 'content'}} messages, got {c!r:.120}")
