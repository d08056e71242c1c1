"""Atomic file writes: a reader (or a resumed run) sees either the old file or the complete new one.

Long evaluations get interrupted; a half-written shard, cache entry or report must never be mistaken
for a finished one. Every writer here goes to a temporary file in the destination's own folder (so the
final `os.replace` is a rename on one filesystem, which POSIX makes atomic) and fsyncs before renaming.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON with sorted-free, indented output; refuses NaN/inf so the file stays strict JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """`np.savez` (uncompressed: shards of uint8 images barely compress) written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())
