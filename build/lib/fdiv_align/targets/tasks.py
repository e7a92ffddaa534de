"""Built-in tasks, by name: ``amazing``, ``science``, ``sentiment``, ``female``, ``code_compiles``,
``reward_model`` (P = a·exp(r/β) with r a reward model trained by ``fdiv-align-rm``).

A :class:`Task` holds the contexts and the scorer; ``task.target(base)`` builds P = a·Φ.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


from ..registry import Registry
from .distributional import DistributionalConstraint
from .scorers import AnyWord, CompilesAsPython, RewardScorer, Scorer, VaderSentiment, WordPresent
from .target import BaseLM, Target

__all__ = ["Task", "get_task", "register_task", "available_tasks", "science_words", "stdlib_signatures", "female_feature"]


@dataclass
class Task:
    name: str
    scorer: Scorer
    contexts: list[str] = field(default_factory=lambda: [""])
    max_new_tokens: int = 30
    description: str = ""

    def target(self, base: BaseLM) -> Target:
        return base * self.scorer


def science_words() -> list[str]:
    text = resources.files("fdiv_align").joinpath("data/science_words.txt").read_text()
    return [w.strip() for w in text.splitlines() if w.strip()]


_FEMALE = re.compile(r"\b(she|her|herself)\b", re.IGNORECASE)
_MALE = re.compile(r"\b(he|him|himself)\b", re.IGNORECASE)


def female_feature(texts, contexts=None) -> list[float]:
    """φ(x) = 1 when x has more she/her/herself than he/him/himself (whole words, any case)."""
    return [float(len(_FEMALE.findall(t)) > len(_MALE.findall(t))) for t in texts]


def stdlib_signatures(limit: int = 64, seed: int = 0) -> list[str]:
    """Function signatures ``def name(args) -> ann:\\n    `` parsed with ``ast`` from the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    sigs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
                sig = f"def {node.name}({ast.unparse(node.args)}){ret}:\n    "
                if len(sig) < 120:
                    sigs.append(sig)
    sigs = sorted(set(sigs))
    random.Random(seed).shuffle(sigs)
    if len(sigs) < limit:
        raise RuntimeError(f"found only {len(sigs)} signatures under {root}")
    return sigs[:limit]


def _amazing(**kw):
    return Task("amazing", WordPresent("amazing", case_sensitive=kw.pop("case_sensitive", False)), **kw,
                description="pointwise: the word 'amazing' occurs")


def _science(**kw):
    return Task("science", AnyWord(science_words(), case_sensitive=kw.pop("case_sensitive", True), name="science_words"),
                **kw, description="pointwise: any word of the GDC science list occurs")


def _sentiment(beta: float = 0.1, **kw):
    kw.setdefault("max_new_tokens", 12)  # a sentence fragment: enough for VADER, and the CPU main job's length
    return Task("sentiment", VaderSentiment(beta=beta), **kw,
                description=f"reward: VADER compound sentiment, P = a·exp(r/{beta})")


def _female(target: float = 0.5, **kw):
    return Task("female", DistributionalConstraint([female_feature], [target], names=["female"], name="female"),
                **kw, description=f"distributional: E_p[more female than male pronouns] = {target}")


def _code_compiles(num_contexts: int = 64, **kw):
    kw.setdefault("max_new_tokens", 40)
    return Task("code_compiles", CompilesAsPython(), contexts=kw.pop("contexts", None) or stdlib_signatures(num_contexts),
                **kw, description="conditional pointwise: stdlib signature + continuation compiles")


def _reward_model(path: str | None = None, beta: float = 0.1, contexts: list[str] | None = None, **kw):
    if not path:
        raise ValueError("task reward_model needs task.params.path: the run directory of fdiv-align-rm (or its "
                         "reward_model.pt)")
    from .reward_model import load_reward_model  # noqa: PLC0415 - loads a model: only for this task

    rm = load_reward_model(path)
    kw.setdefault("max_new_tokens", 12)
    return Task("reward_model", RewardScorer(rm.rewards, beta=beta, name="reward_model"), contexts=contexts or [""], **kw,
                description=f"reward: a trained reward model ({path}), P = a·exp(r/{beta})")


_TASKS = Registry("task", {"amazing": _amazing, "science": _science, "sentiment": _sentiment, "female": _female,
                           "code_compiles": _code_compiles, "reward_model": _reward_model}, params="parameters")


def register_task(name: str, builder=None):
    """Add a task: ``builder(**task.params) -> Task`` under ``name`` (a decorator when ``builder`` is
    omitted), so that ``task.name=<name>`` reaches it from a config."""
    return _TASKS.register(name, builder)


def available_tasks() -> list[str]:
    return _TASKS.names()


def get_task(name: str, **params) -> Task:
    """The task ``name`` built with its parameters (``task.params`` in the config); an unknown
    name or parameter is a ValueError naming it."""
    return _TASKS.build(name, **params)
