"""Photo bytes, content-addressed in a folder (`photos/ab/cdef...` by sha256), written atomically and durably.

Every gallery backend keeps bytes here; a deployment can put the folder on shared storage.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.atomic import fsync_dir, write_atomic

log = logging.getLogger("concord.store")

IO_THREADS = 8
"""Threads that write and fsync photo files of one add concurrently."""
SHARD = re.compile(r"[0-9a-f]{2}")


class BlobStore:
    """Photo bytes by sha256 under `folder` (one file per hash; a hash is stored once)."""

    def __init__(self, folder: Path) -> None:
        """Use (or create) `folder`; its parent's entry for it is made durable."""
        self.folder = Path(folder)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            fsync_dir(self.folder.parent)
        self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="concord-store-io")

    def path(self, content_hash: str) -> Path:
        """Where the bytes of `content_hash` live."""
        return self.folder / content_hash[:2] / content_hash[2:]

    def write(self, items: list[tuple[str, bytes]]) -> None:
        """Write photo bytes atomically and durably: each file, then each directory it went into (in parallel:
        a disk completes concurrent fsyncs several times faster than one after another)."""
        if not items:
            return
        paths = [self.path(content_hash) for content_hash, _ in items]
        new_shards = {path.parent for path in paths if not path.parent.is_dir()}
        for shard in new_shards:
            shard.mkdir(exist_ok=True)
        list(self._io.map(lambda path, data: write_atomic(path, data, sync_dir=False), paths,
                          [data for _, data in items]))
        folders = {path.parent for path in paths} | ({self.folder} if new_shards else set())
        list(self._io.map(fsync_dir, folders))

    def read(self, content_hash: str) -> bytes | None:
        """The bytes of `content_hash`, or None when the file is missing."""
        try:
            return self.path(content_hash).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, hashes: Iterable[str]) -> None:
        """Unlink the files of these hashes (missing ones are fine)."""
        for content_hash in hashes:
            self.path(content_hash).unlink(missing_ok=True)

    def remove_orphans(self, wanted: Callable[[str], set[str]], older_than: float | None = None) -> int:
        """Delete files no row references: `wanted(shard)` gives the referenced hashes of a shard (its first two
        hex digits). With `older_than` (seconds), only files at least that old go: other processes sharing the
        folder may be between writing bytes and committing their rows."""
        removed = 0
        cutoff = None if older_than is None else time.time() - older_than
        for shard in sorted(p for p in self.folder.iterdir() if p.is_dir() and SHARD.fullmatch(p.name)):
            names = {h[2:] for h in wanted(shard.name)}
            for path in shard.iterdir():
                if path.is_file() and path.name not in names:
                    if cutoff is not None and path.stat().st_mtime > cutoff:
                        continue
                    path.unlink()
                    removed += 1
        return removed

    def close(self) -> None:
        """Stop the writer threads."""
        self._io.shutdown()
