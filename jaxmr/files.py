"""Writing files so that a reader (or a resumed run) sees the old content or the new, never half of it.

One helper per idea: `cache_dir` for derived data, `atomic_path` for any writer that takes a path (np.save,
PIL, json), `atomic_dir` for a directory written whole, and `slug` for the file names made from free text
(source names, splits).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` when the block ends without an error, removed
    when it raises. Unique per process and thread (concurrent writers of the same bytes are safe) and with the
    same suffix, so np.save / np.savez add none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir() -> Path:
    """Where generated and derived data is kept (the shapes world's renders, shard indexes): $JAXMR_CACHE, else
    ~/.cache/jaxmr."""
    return Path(os.environ.get("JAXMR_CACHE", "~/.cache/jaxmr")).expanduser()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling directory to fill; it replaces `path` (removed first when it exists) when the block ends
    without an error, and is removed when it raises: `path` is either the old directory or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def slug(text: str, keep: str = "_.=-", max_len: int = 80, default: str = "x") -> str:
    """`text` as a file-name part: characters other than letters, digits and `keep` become "_", leading and
    trailing "_" go, and only the last `max_len` characters are kept (the distinctive end of a long spec)."""
    out = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]", "_", text).strip("_")[-max_len:]
    return out or default
