"""Preference data: pairs (prompt, chosen, rejected[, margin]) in JSONL, and synthetic pairs from any reward.

File format, one JSON object per line (blank lines allowed):

    {"prompt": "…", "chosen": "…", "rejected": "…", "margin": 0.7}      (margin optional, finite, ≥ 0)

:func:`load_preferences` checks every row and names the line and what is wrong (bad JSON, a missing or
unknown key, a non-string or empty text, chosen == rejected, a bad margin, a row repeated); an empty
file is refused. :func:`write_preferences` writes atomically (a temporary file renamed into place), so
nothing is left half-written. :func:`synthetic_preferences` labels pairs of responses by the
Bradley–Terry model P(a ≻ b) = σ((r(a) − r(b))/τ) with the library's random generator, so any scorer
or reward function gives preference data offline.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..files import atomic_write_text, read_lines

__all__ = ["PreferencePair", "PreferenceDataError", "load_preferences", "write_preferences", "synthetic_preferences"]

_KEYS = {"prompt", "chosen", "rejected", "margin"}


class PreferenceDataError(ValueError):
    """A preference file or pair that cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None

    def as_row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _check_row(row, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = sorted({"prompt", "chosen", "rejected"} - set(row))
    unknown = sorted(set(row) - _KEYS)
    if missing or unknown:
        raise PreferenceDataError(f"{where}: " + "; ".join(
            ([f"missing key(s) {', '.join(missing)}"] if missing else []) +
            ([f"unknown key(s) {', '.join(unknown)} (expected prompt, chosen, rejected, margin)"] if unknown else [])))
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row[key], str):
            raise PreferenceDataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    for key in ("chosen", "rejected"):
        if not row[key].strip():
            raise PreferenceDataError(f"{where}: {key!r} is empty")
    if row["chosen"] == row["rejected"]:
        raise PreferenceDataError(f"{where}: chosen and rejected are the same text ({row['chosen'][:60]!r}): no preference")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin) or margin < 0):
        raise PreferenceDataError(f"{where}: 'margin' must be a finite number ≥ 0 (or absent), got {margin!r}")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"], None if margin is None else float(margin))


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file, checked (see the module docstring); ``PreferenceDataError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"preference file {str(path)!r} does not exist")
    pairs, seen = [], {}
    try:
        lines = read_lines(path)
    except ValueError as exc:  # not UTF-8: the message names the line
        raise PreferenceDataError(str(exc)) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        pair = _check_row(row, where)
        key = (pair.prompt, pair.chosen, pair.rejected)
        if key in seen:
            raise PreferenceDataError(f"{where}: the same (prompt, chosen, rejected) as line {seen[key]}")
        seen[key] = number
        pairs.append(pair)
    if not pairs:
        raise PreferenceDataError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def write_preferences(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSONL atomically (every pair checked first; nothing is written if one is bad)."""
    path = Path(path)
    rows = [_check_row(p.as_row(), f"pair {i}").as_row() for i, p in enumerate(pairs)]
    if not rows:
        raise PreferenceDataError("no preference pairs to write")
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def synthetic_preferences(prompts: Sequence[str], responses: Sequence[Sequence[str]],
                          reward: Callable[[list[str], list[str]], Sequence[float]], temperature: float = 1.0,
                          generator: torch.Generator | None = None, with_margin: bool = False,
                          min_gap: float = 0.0) -> list[PreferencePair]:
    """Pairs labelled by Bradley–Terry noise: for prompt i, consecutive responses (2k, 2k+1) of
    ``responses[i]`` form a pair; a is chosen over b with probability σ((r(a) − r(b))/τ), r = ``reward``
    (texts, contexts). Pairs of equal texts are skipped, and so are pairs with |r(a) − r(b)| < ``min_gap``
    (the annotator's "no preference", which preference data sets drop; 0 keeps every pair).
    ``with_margin`` stores |r(a) − r(b)|/τ."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap!r}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    pairs = []
    for prompt, group in zip(prompts, responses):
        group = list(group)
        r = torch.as_tensor(reward(group, [prompt] * len(group)), dtype=torch.float64)
        if r.shape != (len(group),) or not torch.isfinite(r).all():
            raise ValueError(f"reward returned {r.tolist()!r} for {len(group)} responses of prompt {prompt[:60]!r}: "
                             f"expected one finite number each")
        for k in range(0, len(group) - 1, 2):
            a, b = group[k], group[k + 1]
            if a == b or abs(float(r[k] - r[k + 1])) < min_gap:
                continue
            diff = float(r[k] - r[k + 1]) / temperature
            a_wins = bool(torch.rand((), generator=generator, dtype=torch.float64) < torch.sigmoid(torch.tensor(diff)))
            chosen, rejected = (a, b) if a_wins else (b, a)
            pairs.append(PreferencePair(prompt, chosen, rejected, abs(diff) if with_margin else None))
    return pairs
