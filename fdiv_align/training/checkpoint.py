"""Atomic, verified checkpoints.

``save_checkpoint(root, step, state)`` writes ``state`` (anything ``torch.save`` accepts) to a
temporary directory, writes a manifest with each file's size and SHA-256 last, fsyncs, and
renames the directory to ``root/checkpoint-{step:08d}`` (:func:`fdiv_align.files.atomic_path`). A crash at any
moment leaves either the old set of checkpoints or the old set plus a complete new one; stray
temporary directories are ignored. ``load_latest`` returns the newest checkpoint whose manifest
matches its files, skipping (with a warning) any that is truncated or corrupt, and refuses
(:class:`CorruptCheckpointsError`) when checkpoints exist but none is intact.

FSDP runs write sharded checkpoints (:func:`save_sharded_checkpoint`): every rank writes its shards of the
parameters, the optimiser moments and the proposal with ``torch.distributed.checkpoint`` (DCP) into the
``sharded/`` folder of a staging directory that all ranks name alike; rank 0 adds ``state.pt`` (everything
else, small) and the manifest (every file, the shards included) and renames the directory into place, so the
same guarantees hold. DCP stores each tensor's global shape, so :func:`load_sharded` reads a sharded
checkpoint at any world size — into DTensors sharded another way, or into whole tensors in one process.

Reading a checkpoint runs no code from it: ``state.pt`` is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers; older checkpoints' numpy random state and config choices are
allow-listed types whose construction runs nothing else), DCP's shard files the same way (inside DCP), and
DCP's ``.metadata`` pickle by an unpickler that constructs only DCP's own metadata classes, torch dtypes, sizes
and layouts, and paths (:class:`SafeMetadataReader`). A file that needs anything else is refused
(:class:`UnsafeCheckpointError`), naming the file and what it asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

from ..files import UnsafeCheckpointError, atomic_path, safe_torch_load

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "load_sharded", "load_latest", "list_checkpoints",
           "verify_checkpoint", "checkpoint_step", "read_checkpoint", "CorruptCheckpointsError"]

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
SHARDED = "sharded"  # the DCP folder of a sharded checkpoint


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
        _write_manifest(tmp, step)
    _prune(root, keep)
    return final


def _write_manifest(directory: Path, step: int) -> None:
    """The manifest, written last: every file under ``directory`` with its size and SHA-256."""
    files = {str(f.relative_to(directory)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}))


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(root: str | Path, step: int, state: dict, sharded: dict, keep: int, writer: bool) -> Path:
    """Called by every rank of the process group: ``sharded`` (a nested dict of DTensors/tensors) goes to DCP,
    each rank writing its shards; the ``writer`` rank adds ``state`` and the manifest and renames the whole
    into ``root/checkpoint-{step:08d}`` (see the module docstring)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / f"checkpoint-{step:08d}"
    staging = root / f".tmp-{final.name}-shards"  # a name every rank knows; a crashed save's is replaced here
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(sharded, checkpoint_id=staging / SHARDED)  # returns once every rank's shards are written
    if writer:
        with atomic_path(final, directory=True) as tmp:
            os.replace(staging / SHARDED, tmp / SHARDED)
            torch.save(state, tmp / STATE_FILE)
            _write_manifest(tmp, step)
        shutil.rmtree(staging, ignore_errors=True)
        _prune(root, keep)
    dist.barrier()
    return final


def load_sharded(path: Path, template: dict) -> dict:
    """Fill ``template`` (a nested dict of the tensors to load, DTensors or whole tensors, in place) from the
    sharded checkpoint at ``path``; every rank of the process group (if any) calls it."""
    import torch.distributed.checkpoint as dcp

    folder = Path(path) / SHARDED
    with open(folder / ".metadata", "rb") as f:  # refused here, by name, rather than inside DCP's collective
        metadata = _MetadataUnpickler(f).load()
    dcp.load(template, storage_reader=_metadata_reader(folder, metadata))
    return template


def _metadata_reader(path: Path, metadata):
    """DCP's file-system reader handing out ``metadata`` (read by :class:`_MetadataUnpickler`) instead of
    unpickling the file itself (see the module docstring)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(path)


class _MetadataUnpickler(pickle.Unpickler):
    """Constructs only DCP's metadata dataclasses, torch dtypes, ``torch.Size``, layouts and paths."""

    _DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
            "torch.distributed.checkpoint.planner")
    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "PureWindowsPath"), ("pathlib", "Path"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        import dataclasses
        import enum

        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" or module in self._DCP:
            found = super().find_class(module, name)  # a lookup: nothing is constructed or called yet
            metadata_type = isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))
            if isinstance(found, torch.dtype) if module == "torch" else metadata_type:
                return found
        raise UnsafeCheckpointError(f"the DCP metadata of a sharded checkpoint asks for {module}.{name}, which is not "
                                    f"checkpoint metadata: not loaded (it was not written by fdiv_align, or was altered)")


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
    return safe_torch_load(path / STATE_FILE)


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
