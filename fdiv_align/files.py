"""Writing files so that a crash never leaves a half-written one: the package's one atomic-write helper.

:func:`atomic_path` yields a temporary sibling of the destination (a file or a directory, in the same
directory, so that the final rename stays on one file system); when the block ends normally the
temporary is fsynced and renamed over the destination — ``os.replace``, atomic — and the directory
entry fsynced. A failure removes the temporary and leaves the destination as it was; a failure for lack
of space says so, naming the directory (torch's writer reports a full disk as ``unexpected pos``). A directory cannot be
renamed over an existing one, so an old copy is first renamed aside (``.old-<name>-*``) and removed only once
the new one is in place; a crash between the two renames leaves the complete old copy aside and the complete
new one as a temporary, and :func:`finish_interrupted_writes` (run on the next start) puts the old copy back
and removes the leftovers.

:func:`safe_torch_load` is the package's one way to read a ``torch.save`` file: weights-only, so that a
crafted file cannot run code when it is loaded (:class:`UnsafeCheckpointError` instead).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["safe_torch_load", "UnsafeCheckpointError", "atomic_path", "atomic_write_text", "fsync_path", "read_jsonl",
           "read_lines", "finish_interrupted_writes"]

TEMPORARY, ASIDE = ".tmp-", ".old-"  # the name prefixes of atomic_path's temporaries and set-aside old copies


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
    there is renamed aside first and removed after: see the module docstring)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TEMPORARY}{destination.name}-"
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
        aside = None
        if directory and destination.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f"{ASIDE}{destination.name}-", dir=destination.parent))
            aside.rmdir()  # a fresh name, free again: renaming onto it works on every OS
            os.replace(destination, aside)
        os.replace(tmp, destination)
        fsync_path(destination.parent)
        if aside is not None:
            shutil.rmtree(aside)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _out_of_space(exc, destination.parent):
            raise OSError(errno.ENOSPC, f"no space left on the device of {destination.parent} while writing "
                                        f"{destination.name} ({type(exc).__name__}: {str(exc)[:120]}); the previous "
                                        f"version, if any, is kept: free some space and run again") from exc
        raise


#: below this many free bytes a failed write is reported as a full disk
LOW_SPACE = 1 << 20


def _out_of_space(exc: Exception, directory: Path) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC, or a writer's own error (torch's
    ``unexpected pos``, ``basic_ios::clear``) while the file system is (nearly) full."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:
        return False


def finish_interrupted_writes(directory: str | os.PathLike) -> list[str]:
    """Clean up after :func:`atomic_path` writes that a crash interrupted in ``directory`` (its direct entries):
    an old copy renamed aside whose destination is missing is put back (the new copy never arrived); other
    old copies and every temporary are removed. Call it only where no other process is writing (the run
    directory's lock held). Returns a line per action taken."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(ASIDE):
            original = directory / entry.name[len(ASIDE):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(entry, original)
                done.append(f"{original.name} restored from {entry.name} (a replacement was interrupted)")
                continue
        elif not entry.name.startswith(TEMPORARY):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        done.append(f"removed {entry.name} (left by an interrupted write)")
    return done


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (without their ends); a line that is not UTF-8 is an error naming the file,
    the line and the byte (a binary file given where text is expected)."""
    return _decode_lines(Path(path).read_bytes(), path)


def _decode_lines(data: bytes, path) -> list[str]:
    lines = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}): "
                             f"expected a text file") from None
    if data.endswith(b"\n") or not data:
        lines.pop()
    return lines


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, object]], int | None]:
    """The records of an append-only JSON-lines file as (line, value) pairs, and the number of a torn last
    line that was dropped (None if there was none). A last line with no newline after it that is not JSON (or
    not UTF-8) is what a crash or a full disk leaves mid-write: it is dropped (the caller says so); any other
    line that is not JSON is an error naming the file and the line."""
    data = Path(path).read_bytes()
    cut = data.rfind(b"\n") + 1  # the complete lines, and what follows the last newline
    lines, tail = _decode_lines(data[:cut], path), data[cut:]
    records, torn = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON record ({exc}); the file is damaged — repair or remove "
                             f"that line") from None
    if tail.strip():
        try:
            line = tail.decode("utf-8")
            records.append((line, json.loads(line)))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            torn = len(lines) + 1
    return records, torn


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint (or reward model) file asks to construct something beyond plain data: it is not read."""


def _legacy_types() -> list:
    """Types that files written by earlier versions hold (numpy's random state; config choices): constructing
    them runs no code from the file."""
    import numpy as np

    from .config import Choice

    numpy_core = getattr(np, "_core", None) or np.core  # numpy ≥ 2 | 1.x
    choices, todo = [], list(Choice.__subclasses__())
    while todo:
        choices.append(todo.pop())
        todo.extend(choices[-1].__subclasses__())
    return [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *choices]


def safe_torch_load(path: str | Path):
    """``torch.load(path, weights_only=True)`` (plus :func:`_legacy_types`) on the CPU; a file that asks for more
    is refused with :class:`UnsafeCheckpointError` naming it — nothing in it is run."""
    import torch

    try:
        with torch.serialization.safe_globals(_legacy_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = re.search(r"GLOBAL (\S+)", str(exc))
        asked = asked.group(1) if asked else str(exc).strip().splitlines()[-1][:200]
        raise UnsafeCheckpointError(f"{path} asks to run or construct something that is not plain data ({asked}); it was "
                                    f"not loaded. fdiv_align's files hold only tensors and plain data: this one was not "
                                    f"written by it, or was altered") from None
