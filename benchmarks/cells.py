"""A benchmark's results as one compact JSONL file: one finished cell (a JSON object) per line.

A cell is written when it completes (one appended line, flushed and fsynced), so an interrupted
benchmark resumes where it stopped and deleting a cell's line re-runs only that cell. A torn last
line — what a crash in the middle of a write leaves — is dropped with a message; any other bad line
is an error naming the file and the line. Pages are regenerated from these files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fdiv_align.files import atomic_write_text, read_jsonl

__all__ = ["CellStore"]


class CellStore:
    """The cells of ``path``; ``key`` names the fields that identify a cell (a field a cell lacks counts as None)."""

    def __init__(self, path: str | os.PathLike, key: tuple[str, ...]):
        self.path, self.key = Path(path), tuple(key)
        self._torn = False
        self._rows = self._read()

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records, torn = read_jsonl(self.path)
        if torn:
            print(f"{self.path}:{torn}: dropping a torn last line (an interrupted write)", file=sys.stderr)
            self._torn = True
        return [record for _, record in records]

    def _key_of(self, row: dict) -> tuple:
        return tuple(row.get(k) for k in self.key)

    def rows(self, **match) -> list[dict]:
        """The cells whose fields equal ``match``, in the order they were written."""
        return [r for r in self._rows if all(r.get(k) == v for k, v in match.items())]

    def get(self, **key) -> dict | None:
        """The cell with this key, or None (the last one if it was written twice)."""
        found = [r for r in self._rows if self._key_of(r) == tuple(key.get(k) for k in self.key)]
        return found[-1] if found else None

    def add(self, row: dict) -> None:
        """Append a finished cell."""
        if self._torn:  # rewrite without the torn line first
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows))
            self._torn = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._rows.append(row)
