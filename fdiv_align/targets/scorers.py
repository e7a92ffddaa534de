"""Scorers Φ(x, c) ≥ 0, handled as log-scores log Φ (log 0 = −∞).

Every scorer maps (texts, contexts) to a float64 tensor [N] of log-scores and is checked: a
scorer that raises, or returns NaN, +∞ or (for probabilities) a negative value, is reported with
its name and the offending text. Scorers compose by ``*`` (log-scores add).

* boolean b ∈ {0,1} → log b ∈ {0, −∞}: :class:`WordPresent`, :class:`AnyWord`, :class:`RegexMatch`,
  :class:`CompilesAsPython` (``compile`` only — the code is never executed), :class:`BooleanScorer`;
* reward exp(r/β) → r/β: :class:`RewardScorer`, :class:`VaderSentiment`, :class:`ClassifierReward`;
* probability-valued Φ ∈ [0, 1] → log Φ: :class:`ProbabilityScorer`;
* exponential exp(λ·φ) → λ·φ: :class:`fdiv_align.targets.distributional.DistributionalConstraint`.
"""

from __future__ import annotations

import inspect

import math
import re
import warnings
from typing import Callable, Sequence

import torch

from ..extras import require

__all__ = ["Scorer", "ProductScorer", "BooleanScorer", "WordPresent", "AnyWord", "RegexMatch", "CompilesAsPython",
           "RewardScorer", "VaderSentiment", "ClassifierReward", "ProbabilityScorer", "ScorerError"]


class ScorerError(ValueError):
    """A scorer failed or returned an invalid value for a text."""


class Scorer:
    """Base class. Subclasses implement :meth:`_log_scores`; :meth:`log_scores` validates it."""

    name: str = "scorer"

    def _log_scores(self, texts: list[str], contexts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def alignment(self, texts: list[str], contexts: list[str]) -> torch.Tensor:
        """The per-sample quantity reported as alignment (b, r or φ); default: exp(log-score)."""
        return torch.exp(self.log_scores(texts, contexts))

    def alignment_from_log_scores(self, log_scores: torch.Tensor, texts, contexts) -> torch.Tensor:
        """Alignment given this scorer's already computed log-scores (no second scoring pass where the
        alignment is a function of them; recomputed otherwise)."""
        return self.alignment(texts, contexts)

    def log_scores(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> torch.Tensor:
        texts = list(texts)
        contexts = [""] * len(texts) if contexts is None else list(contexts)
        if len(contexts) != len(texts):
            raise ValueError(f"{self.name}: {len(texts)} texts but {len(contexts)} contexts")
        try:
            out = self._log_scores(texts, contexts)
        except ScorerError:
            raise
        except Exception as exc:  # report which scorer failed and on what
            raise ScorerError(f"scorer {self.name!r} raised {type(exc).__name__}: {exc} (batch of {len(texts)}, "
                              f"first text {texts[0][:80]!r})") from exc
        out = torch.as_tensor(out, dtype=torch.float64).flatten()
        if out.numel() != len(texts):
            raise ScorerError(f"scorer {self.name!r} returned {out.numel()} values for {len(texts)} texts")
        bad = torch.isnan(out) | torch.isposinf(out)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ScorerError(f"scorer {self.name!r} returned log-score {float(out[i])} for text {texts[i][:120]!r}")
        return out

    def __mul__(self, other: "Scorer") -> "ProductScorer":
        if not isinstance(other, Scorer):
            return NotImplemented
        return ProductScorer([self, other])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ProductScorer(Scorer):
    """Π Φ_i: log-scores add."""

    def __init__(self, scorers: list[Scorer]):
        flat = []
        for s in scorers:
            flat.extend(s.scorers if isinstance(s, ProductScorer) else [s])
        self.scorers = flat
        self.name = " * ".join(s.name for s in flat)

    def _log_scores(self, texts, contexts):
        return sum(s.log_scores(texts, contexts) for s in self.scorers)

    def components(self, texts, contexts) -> dict[str, torch.Tensor]:
        """Each factor's log-scores, in order; a repeated name gets a ``#k`` suffix (no factor is lost)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.scorers:
            key = s.name if s.name not in out else f"{s.name}#{len(out)}"
            out[key] = s.log_scores(texts, contexts)
        return out


# ----------------------------------------------------------------------------- boolean


class BooleanScorer(Scorer):
    """b(x, c) ∈ {0, 1} from a predicate ``fn(text, context) -> bool``; log-score 0 or −∞."""

    def __init__(self, predicate: Callable[[str, str], bool], name: str = "boolean"):
        self.predicate = predicate
        self.name = name

    def _test(self, text: str, context: str) -> bool:
        return self.predicate(text, context)

    def _log_scores(self, texts, contexts):
        out = torch.empty(len(texts), dtype=torch.float64)
        for i, (t, c) in enumerate(zip(texts, contexts)):
            v = self._test(t, c)
            if v not in (True, False, 0, 1):
                raise ScorerError(f"boolean scorer {self.name!r} returned {v!r} (expected True/False) for text {t[:120]!r}")
            out[i] = 0.0 if v else -math.inf
        return out

    def alignment(self, texts, contexts):
        return torch.exp(self.log_scores(texts, contexts))

    def alignment_from_log_scores(self, log_scores, texts, contexts):
        return torch.exp(log_scores)


class AnyWord(BooleanScorer):
    """1 when any of ``words`` occurs as a whole word (``\\b`` boundaries); case-sensitive by default."""

    def __init__(self, words: Sequence[str], case_sensitive: bool = True, name: str | None = None):
        words = [w for w in words if w]
        if not words:
            raise ValueError("AnyWord: empty word list")
        self.words = list(words)
        flags = 0 if case_sensitive else re.IGNORECASE
        self.pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", flags)
        super().__init__(lambda t, c: self.pattern.search(t) is not None,
                         name or (f"word:{words[0]}" if len(words) == 1 else f"any_of_{len(words)}_words"))


class WordPresent(AnyWord):
    """1 when ``word`` occurs as a whole word."""

    def __init__(self, word: str, case_sensitive: bool = True):
        super().__init__([word], case_sensitive, name=f"word:{word}")


class RegexMatch(BooleanScorer):
    """1 when ``re.search(pattern, text)`` matches."""

    def __init__(self, pattern: str, flags: int = 0, name: str | None = None):
        self.regex = re.compile(pattern, flags)
        super().__init__(lambda t, c: self.regex.search(t) is not None, name or f"regex:{pattern}")


class CompilesAsPython(BooleanScorer):
    """1 when ``context + text`` compiles as a Python module (``compile(..., 'exec')``).

    Only the compiler runs: the code object is discarded, never executed. Syntax, value, overflow,
    recursion and memory errors during compilation all count as "does not compile".
    """

    def __init__(self, include_context: bool = True, name: str = "compiles"):
        self.include_context = include_context
        super().__init__(self._compiles, name)

    def _compiles(self, text: str, context: str) -> bool:
        source = (context + text) if self.include_context else text
        try:
            with warnings.catch_warnings():  # SyntaxWarnings about a sample's code are not ours to print
                warnings.simplefilter("ignore", SyntaxWarning)
                compile(source, "<fdiv_align-sample>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return False
        return True


# ----------------------------------------------------------------------------- rewards


def _takes_contexts(fn) -> bool:
    """Whether ``fn`` takes (texts, contexts) rather than (texts) alone."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): the documented two-argument form
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2


class RewardScorer(Scorer):
    """exp(r(x, c)/β): log-score r/β. ``fn(texts, contexts)`` or ``fn(texts)`` → one float per text
    (batched); a wrong number of values, NaN or ±inf is a ScorerError naming the function."""

    def __init__(self, fn: Callable[..., Sequence[float]], beta: float = 1.0, name: str = "reward"):
        if not beta > 0:
            raise ValueError(f"{name}: beta must be > 0, got {beta}")
        if not callable(fn):
            raise TypeError(f"{name}: the reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.beta = float(beta)
        self.name = name
        self._with_contexts = _takes_contexts(fn)

    def rewards(self, texts, contexts) -> torch.Tensor:
        values = self.fn(list(texts), list(contexts)) if self._with_contexts else self.fn(list(texts))
        try:
            r = torch.as_tensor(values, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ScorerError(f"reward {self.name!r} returned {type(values).__name__}, not numbers: {exc}") from None
        if r.numel() != len(texts):
            raise ScorerError(f"reward {self.name!r} returned {r.numel()} values for {len(texts)} texts")
        bad = ~torch.isfinite(r)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ScorerError(f"reward {self.name!r} returned {float(r[i])} for text {texts[i][:120]!r}")
        return r

    def _log_scores(self, texts, contexts):
        return self.rewards(texts, contexts) / self.beta

    def alignment(self, texts, contexts):
        return self.rewards(texts, contexts)

    def alignment_from_log_scores(self, log_scores, texts, contexts):
        return log_scores * self.beta  # r = β · (r/β)


class VaderSentiment(RewardScorer):
    """r = VADER compound sentiment score ∈ [−1, 1] (lexicon shipped in ``vadersentiment``)."""

    def __init__(self, beta: float = 0.1):
        require("tasks", "the VADER sentiment scorer (task sentiment)")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        super().__init__(lambda texts, contexts: [analyzer.polarity_scores(t)["compound"] for t in texts], beta,
                         name="vader_sentiment")


class ClassifierReward(RewardScorer):
    """r from a local Hugging Face ``AutoModelForSequenceClassification`` directory: with one label (a reward
    model, as TRL trains them) its logit; with several, log p(``label`` | x) — or the label's raw logit
    with ``use_logit`` — where ``label`` (a name or an index) must be given."""

    def __init__(self, model_dir: str, label: int | str | None = None, beta: float = 1.0, use_logit: bool = False,
                 batch_size: int = 32, device: str = "cpu", include_context: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
        num_labels = self.model.config.num_labels
        if num_labels == 1:  # a scalar reward head: log-softmax over one class would be 0 for every text
            if label not in (None, 0, *self.model.config.label2id):
                raise ValueError(f"{model_dir} has one label (a reward model: its logit is the reward); got label={label!r}")
            label, use_logit = 0, True
        elif label is None:
            raise ValueError(f"{model_dir} has {num_labels} labels {sorted(self.model.config.label2id)}: name the one "
                             f"whose log-probability is the reward (label=...)")
        if isinstance(label, str):
            label2id = self.model.config.label2id
            if label not in label2id:
                raise ValueError(f"label {label!r} not in the classifier's labels {sorted(label2id)}")
            label = label2id[label]
        if not 0 <= int(label) < num_labels:
            raise ValueError(f"label index {label} out of range for {num_labels} labels")
        if self.tokenizer.pad_token is None:  # GPT-2-style reward models: pad with EOS, as TRL does
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.label, self.use_logit, self.batch_size, self.device = int(label), use_logit, batch_size, device
        self.include_context = include_context
        super().__init__(self._score, beta, name=f"classifier:{model_dir}:{label}")

    @torch.no_grad()
    def _score(self, texts, contexts):
        inputs = [c + t for c, t in zip(contexts, texts)] if self.include_context else texts
        out = []
        for i in range(0, len(inputs), self.batch_size):
            enc = self.tokenizer(inputs[i:i + self.batch_size], padding=True, truncation=True, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            vals = logits[:, self.label] if self.use_logit else torch.log_softmax(logits, -1)[:, self.label]
            out.append(vals.cpu())
        return torch.cat(out)


class ProbabilityScorer(Scorer):
    """Φ = fn(texts, contexts) ∈ [0, 1] (e.g. a classifier probability); log-score log Φ."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], name: str = "probability"):
        self.fn = fn
        self.name = name

    def _log_scores(self, texts, contexts):
        v = torch.as_tensor(self.fn(list(texts), list(contexts)), dtype=torch.float64).flatten()
        bad = torch.isnan(v) | (v < 0) | (v > 1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ScorerError(f"scorer {self.name!r} returned {float(v[i])} (expected a probability in [0, 1]) for text "
                              f"{texts[i][:120]!r}; for an unbounded positive score use RewardScorer")
        return torch.log(v)
