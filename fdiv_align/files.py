"""Writing files so that a crash never leaves a half-written one: the package's one atomic-write helper.

:func:`atomic_path` yields a temporary sibling of the destination (a file or a directory, in the same
directory, so that the final rename stays on one file system); when the block ends normally the
temporary is fsynced and renamed over the destination — ``os.replace``, atomic — and the directory
entry fsynced. A failure removes the temporary and leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "fsync_path", "read_jsonl"]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
    fsync_path(path)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, directory: bool = False):
    """Yield a temporary path next to ``destination`` (an empty directory when ``directory``, else a
    path to write a file at); on success it replaces ``destination`` atomically (an existing directory
    there is removed first: the one non-atomic moment, between a complete old and a complete new copy)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{destination.name}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=destination.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=destination.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would give, not mkstemp's 0600
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
        fsync_path(destination.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, object]], int | None]:
    """The records of an append-only JSON-lines file as (line, value) pairs, and the number of a torn last
    line that was dropped (None if there was none). A last line that is not JSON and has no newline after it
    is what a crash or a full disk leaves mid-write: it is dropped (the caller says so); any other line that
    is not JSON is an error naming the file and the line."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records, torn = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if n != len(lines):
                raise ValueError(f"{path}:{n}: not a JSON record ({exc}); the file is damaged — repair or remove "
                                 f"that line") from None
            torn = n
    return records, torn
