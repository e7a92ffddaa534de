"""A run's directory: its checkpoints, its records and its summary — one helper for both training loops
(the f-DPG :class:`~fdiv_align.training.trainer.Trainer` and pair training, fdiv_align/preferences).

Layout: ``checkpoints/checkpoint-<step>/`` (fdiv_align/training/checkpoint.py: atomic, verified),
``metrics.jsonl`` and ``samples.jsonl`` (append-only records, fdiv_align/training/metrics.py),
``summary.json`` (written atomically, last: a run is finished when it says so), plus whatever a loop
adds (``RunDir(..., artifacts=...)``: a reward model, an adapter). Only the writing process (rank 0)
changes anything.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

from ..files import atomic_write_text
from .checkpoint import load_latest, save_checkpoint, save_sharded_checkpoint
from .metrics import say

__all__ = ["RunDir", "json_safe"]

RECORDS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json")


def json_safe(obj):
    """NaN/±inf → None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class RunDir:
    """``path`` (created); ``writer``: whether this process writes (rank 0); ``artifacts``: further
    names a run leaves there, set aside with the records on a fresh start."""

    def __init__(self, path: str | os.PathLike, writer: bool = True, artifacts: tuple[str, ...] = ()):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.artifacts = tuple(artifacts)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def summary(self) -> dict | None:
        """The summary a finished run left here, or None."""
        if not self.summary_path.exists():
            return None
        try:
            return json.loads(self.summary_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.summary_path} is not valid JSON ({exc}): move it aside to resume the run from "
                             f"its checkpoints") from None

    def latest_checkpoint(self) -> tuple[int, dict, Path] | None:
        """(step, state, path) of the newest intact checkpoint, None when there is none (every one
        corrupt: :class:`~fdiv_align.training.checkpoint.CorruptCheckpointsError`)."""
        return load_latest(self.checkpoints)

    def save_checkpoint(self, step: int, state: dict, keep: int, sharded: dict | None = None) -> Path | None:
        """A checkpoint of ``state`` (written by the writer; None elsewhere); with ``sharded`` (FSDP: every
        rank calls) also its DCP shards (fdiv_align/training/checkpoint.py)."""
        if sharded is not None:
            path = save_sharded_checkpoint(self.checkpoints, step, state, sharded, keep, self.writer)
            return path if self.writer else None
        if not self.writer:
            return None
        return save_checkpoint(self.checkpoints, step, state, keep)

    def set_aside(self, reason: str) -> Path | None:
        """A fresh start where an earlier run left files: move them to ``superseded-<time>/`` so that
        nothing is deleted and no record is mixed with this run's; returns that folder (None: nothing to move)."""
        if not self.writer:
            return None
        old = [self.path / n for n in RECORDS + self.artifacts if (self.path / n).exists()]
        if not old:
            return None
        aside = self.path / f"superseded-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        aside.mkdir()
        for p in old:
            os.replace(p, aside / p.name)
        say(f"starting over ({reason}): the earlier run's {', '.join(p.name for p in old)} moved to {aside}")
        return aside

    def write_summary(self, summary: dict) -> None:
        """summary.json, atomically (NaN/inf written as null)."""
        if self.writer:
            atomic_write_text(self.summary_path, json.dumps(json_safe(summary), indent=2, default=float))
