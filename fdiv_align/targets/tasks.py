"""Built-in tasks, by name: ``amazing``, ``science``, ``sentiment``, ``female``, ``code_compiles``,
``reward_model`` (P = a·exp(r/β) with r a reward model trained by ``fdiv-align-rm``).

A :class:`Task` holds the contexts and the scorer; ``task.target(base)`` builds P = a·Φ.
"""

from __future__ import annotations

import ast
import importlib
import random
import re
import sysconfig
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


from ..registry import Registry
from .distributional import DistributionalConstraint
from .scorers import AnyWord, ClassifierReward, CompilesAsPython, RewardScorer, Scorer, VaderSentiment, WordPresent
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


def resolve_callable(spec: str, what: str):
    """The object ``package.module:attribute`` names (``what``: the config key, for the error)."""
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what}={spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what}={spec!r}: cannot import {module_name!r} ({exc})") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what}={spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what}={spec!r} is a {type(target).__name__}, not a function")
    return target


def _reward_function(function: str | None = None, beta: float = 0.1, contexts: list[str] | None = None, **kw):
    if not function:
        raise ValueError("task reward_function needs task.params.function: 'package.module:function', a function "
                         "from a list of texts (and optionally their contexts) to one float each")
    fn = resolve_callable(function, "task.params.function")
    return Task("reward_function", RewardScorer(fn, beta=beta, name=function), contexts=contexts or [""], **kw,
                description=f"reward: {function}, P = a·exp(r/{beta})")


def _classifier(path: str | None = None, label: int | str | None = None, beta: float = 1.0, use_logit: bool = False,
                include_context: bool = False, contexts: list[str] | None = None, **kw):
    if not path:
        raise ValueError("task classifier needs task.params.path: a Hugging Face sequence-classification directory")
    if not (Path(path) / "config.json").exists():
        raise ValueError(f"task.params.path={path!r} is not a Hugging Face model directory (no config.json there)")
    scorer = ClassifierReward(path, label=label, beta=beta, use_logit=use_logit, include_context=include_context)
    return Task("classifier", scorer, contexts=contexts or [""], **kw,
                description=f"reward: the classifier {path} (label {scorer.label}), P = a·exp(r/{beta})")


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
                           "code_compiles": _code_compiles, "reward_model": _reward_model,
                           "reward_function": _reward_function, "classifier": _classifier}, params="parameters")


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
