"""Atomic, verified checkpoints.

``save_checkpoint(root, step, state)`` writes ``state`` (anything ``torch.save`` accepts) to a
temporary directory, writes a manifest with each file's size and SHA-256 last, fsyncs, and
renames the directory to ``root/checkpoint-{step:08d}`` (:func:`fdiv_align.files.atomic_path`). A crash at any
moment leaves either the old set of checkpoints or the old set plus a complete new one; stray
temporary directories are ignored. ``load_latest`` returns the newest checkpoint whose manifest
matches its files, skipping (with a warning) any that is truncated or corrupt, and refuses
(:class:`CorruptCheckpointsError`) when checkpoints exist but none is intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch

from ..files import atomic_path

__all__ = ["save_checkpoint", "load_latest", "list_checkpoints", "verify_checkpoint", "checkpoint_step", "read_checkpoint",
           "CorruptCheckpointsError"]

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    root = Path(root)
    final = root / f"checkpoint-{step:08d}"
    with atomic_path(final, directory=True) as tmp:
        torch.save(state, tmp / STATE_FILE)
        manifest = {"step": step, "files": {STATE_FILE: {"bytes": (tmp / STATE_FILE).stat().st_size,
                                                         "sha256": _sha256(tmp / STATE_FILE)}}}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))


def verify_checkpoint(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.exists() or f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


class CorruptCheckpointsError(RuntimeError):
    """Checkpoints exist but none passes verification: resuming is impossible and starting over
    would silently discard them."""


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's manifest records."""
    return int(json.loads((path / MANIFEST).read_text())["step"])


def read_checkpoint(path: Path) -> dict:
    """The state a (verified) checkpoint holds."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_latest(root: str | Path) -> tuple[int, dict, Path] | None:
    """(step, state, path) of the newest valid checkpoint under root; None when there is no checkpoint.
    A corrupt newer checkpoint is skipped with a warning naming the one used instead; if every
    checkpoint is corrupt, :class:`CorruptCheckpointsError` (nothing is deleted)."""
    found = list_checkpoints(root)
    for i, path in enumerate(reversed(found)):
        if verify_checkpoint(path):
            state = read_checkpoint(path)
            if i:
                warnings.warn(f"checkpoint(s) {', '.join(p.name for p in found[len(found) - i:])} in {root} are "
                              f"incomplete or corrupt (manifest mismatch); resuming from {path.name}", RuntimeWarning,
                              stacklevel=2)
            return checkpoint_step(path), state, path
    if found:
        raise CorruptCheckpointsError(
            f"every checkpoint in {root} ({', '.join(p.name for p in found)}) is incomplete or corrupt (manifest "
            f"mismatch), so the run cannot resume. Nothing was changed. To start over in this directory set "
            f"trainer.resume=false (the old files are moved to a superseded-* folder), or use another output_dir")
    return None
