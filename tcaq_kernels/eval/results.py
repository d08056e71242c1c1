"""The shared results table `benchmarks/results/quality.json`: a JSON list of rows, one per measurement.

Several jobs write to it (the full-precision row here, every calibration preset elsewhere), so a
writer replaces only the rows with its own identity — (preset, bits, n_samples) — and keeps all
others. The read-modify-write holds an advisory lock on the file's folder, and the new list is written
atomically, so two writers cannot lose each other's rows and a reader never sees broken JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..atomic import atomic_write_json

#: Fields that identify a row; a new row replaces an old one when all of these are equal.
ROW_KEY = ("preset", "bits", "n_samples")
#: Default results file, relative to the repository root.
QUALITY_JSON = Path("benchmarks") / "results" / "quality.json"


def row_key(row: dict, key: Sequence[str] = ROW_KEY) -> tuple:
    missing = [k for k in key if k not in row]
    if missing:
        raise KeyError(f"row lacks identifying field(s) {missing}: {row}")
    return tuple(row[k] for k in key)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on the file's folder (no lock file left behind; no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results file ([] when it does not exist); refuses anything but a list of objects."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it before adding rows") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of row objects")
    return rows


def merge_rows(old: Iterable[dict], new: Iterable[dict], key: Sequence[str] = ROW_KEY) -> list[dict]:
    """Pure merge: each new row replaces the old row with its key in place, or is appended."""
    rows = list(old)
    index = {row_key(r, key): i for i, r in enumerate(rows) if all(k in r for k in key)}
    for r in new:
        k = row_key(r, key)
        if k in index:
            rows[index[k]] = r
        else:
            index[k] = len(rows)
            rows.append(r)
    return rows


def upsert_rows(path: str | os.PathLike, rows: Iterable[dict], key: Sequence[str] = ROW_KEY) -> list[dict]:
    """Add or replace `rows` in the results file at `path`; returns the file's new content."""
    path = Path(path)
    rows = list(rows)
    for r in rows:
        row_key(r, key)  # validate before touching the file
    with _locked(path):
        merged = merge_rows(read_rows(path), rows, key)
        atomic_write_json(path, merged)
    return merged
