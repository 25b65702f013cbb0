"""Crash-safe files: a file appears under its name whole or not at all (temporary file, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"
"""Every temporary file ends so; one left by a crash is removed at the next open (`remove_tmp_files`)."""

Chunk = bytes | bytearray | memoryview


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (POSIX needs the directory itself synced)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: Chunk | Iterable[Chunk], sync_dir: bool = True) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the whole new one, never a part.

    With `sync_dir=False` the caller syncs `path.parent` itself (once for many files).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")  # writers never share one
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def remove_tmp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a crash left anywhere under `folder`; returns what was removed."""
    removed = []
    for path in folder.rglob(f"*{TMP_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
