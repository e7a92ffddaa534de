"""A run's directory: its checkpoints, its records and its summary — one helper for both training loops
(the f-DPG :class:`~fdiv_align.training.trainer.Trainer` and pair training, fdiv_align/preferences).

Layout: ``checkpoints/checkpoint-<step>/`` (fdiv_align/training/checkpoint.py: atomic, verified),
``metrics.jsonl`` and ``samples.jsonl`` (append-only records, fdiv_align/training/metrics.py),
``summary.json`` (written atomically, last: a run is finished when it says so), plus whatever a loop
adds (``RunDir(..., artifacts=...)``: a reward model, an adapter), and ``.hydra/`` when the CLI ran it.
Only the writing process (rank 0) changes anything.

One run at a time: the writer holds an exclusive lock on ``.lock`` (``flock``; the file names the holder's
pid, host and start time) from :class:`RunDir` until :meth:`RunDir.close` or its exit. A second process
opening the directory is refused at once (:class:`RunDirLockedError`, naming the holder). The operating
system releases the lock of a process that dies, so a stale ``.lock`` never blocks a resume. Within one
process the lock is shared (a test or a notebook may open the directory again). Once locked, writes that a
crash interrupted (``.tmp-*``/``.old-*``: fdiv_align/files.py) are finished or removed.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
from pathlib import Path

from ..files import atomic_write_text, finish_interrupted_writes
from .checkpoint import load_latest, save_checkpoint, save_sharded_checkpoint
from .metrics import say

__all__ = ["RunDir", "RunDirLockedError", "json_safe"]

RECORDS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json", ".hydra")
LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory."""


_HELD: dict[Path, list] = {}  # run directory → [open lock file, users in this process]


def _lock(path: Path) -> None:
    """Take (or share, within this process) the exclusive lock of run directory ``path``."""
    key = path.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return
    f = open(key / LOCK_FILE, "a+", encoding="utf-8")
    try:
        _try_lock(f)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown (it has not written its name yet)"
        f.close()
        raise RunDirLockedError(f"{path} is in use by another run ({holder}): wait for it to end, stop it, or use "
                                f"another output_dir. (A lock left by a process that died does not block.)") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    _HELD[key] = [f, 1]


def _try_lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(path: Path) -> None:
    key = path.resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        held[0].close()  # closing the file releases the lock; the file stays (removing it would race)


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
        self._locked = False
        if writer:
            _lock(self.path)
            self._locked = True
            for directory in (self.path, self.checkpoints):
                for line in finish_interrupted_writes(directory):
                    say(f"{directory}: {line}")

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self._locked:
            self._locked = False
            _unlock(self.path)

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
