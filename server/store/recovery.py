"""How the embedded store brings its FAISS cache level with the SQLite catalogue at open (the catalogue is the truth).

Load the snapshot, replay the adds and deletes the catalogue recorded after the snapshot's sequence, prove that
the index holds exactly the catalogue's ids; rebuild from the catalogue when any step fails.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from server.store.catalogue import Catalogue, Filter
from server.vector_index import IndexSpec, SnapshotError, SnapshotMissing, VectorIndex, read_snapshot

log = logging.getLogger("concord.store")

COMPACT_SHARE = 0.25
"""An HNSW index whose tombstones pass this share of its entries is rebuilt at open."""
SNAPSHOT_EVERY = 1000
"""Changes after which an add writes a fresh FAISS snapshot in the background (0: only at shutdown), so a crash
after long uptime replays at most about this many changes at the next start."""


class PeriodicSnapshots:
    """Runs `save` in a background thread once `every` changes are not in the last snapshot (one at a time)."""

    def __init__(self, every: int, save: Callable[[], None], folder: Path) -> None:
        self.every = every
        self._save = save
        self._folder = folder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="concord-snapshot")
        self._running: Future[None] | None = None
        self.closed = False

    def changed(self, unsaved: int) -> None:
        """Called after each add with the number of changes the last snapshot lacks."""
        if self.every > 0 and unsaved >= self.every and (self._running is None or self._running.done()):
            self._running = self._pool.submit(self._run)

    def _run(self) -> None:
        try:
            self._save()
        except Exception:  # the next one will try again; the catalogue has every change meanwhile
            if not self.closed:
                log.exception("store %s: the periodic index snapshot failed", self._folder)

    def wait(self) -> None:
        """Wait until a background snapshot in progress is written (benchmarks and tests)."""
        if self._running is not None:
            self._running.result()

    def close(self) -> None:
        self.closed = True
        self._pool.shutdown(wait=True)


def load_index(conn: sqlite3.Connection, spec: IndexSpec, dim: int, store_id: str, snapshot: Path,
               catalogue_seq: int, folder: Path) -> tuple[VectorIndex, str, int, str | None]:
    """The index level with the catalogue at `catalogue_seq`: (index, state, changes replayed, reason), state
    "loaded" (the snapshot was current), "replayed" or "rebuilt"."""
    index: VectorIndex | None = None
    replayed, reason = 0, None
    try:
        index, seq = read_snapshot(snapshot, spec, dim, store_id)
    except SnapshotMissing as err:
        reason = str(err)
    except SnapshotError as err:
        reason = str(err)
        log.warning("store %s: ignoring the index snapshot: %s; rebuilding it from the catalogue", folder, err)
    if index is not None and seq > catalogue_seq:
        reason = f"the snapshot holds sequence {seq}, beyond the catalogue's {catalogue_seq}"
        index = None
    if index is not None:
        replayed = replay(conn, index, seq, dim)
        problem = disagreement(conn, index)
        if problem:
            reason = f"after replaying the catalogue the index disagrees with it: {problem}"
            index = None
        elif index.tombstone_share > COMPACT_SHARE:
            reason = f"compacting: {index.tombstone_share:.0%} of the HNSW entries are deleted photos"
            index = None
    if index is None:
        if reason and not reason.startswith("no index snapshot"):
            log.warning("store %s: rebuilding the FAISS index from SQLite (%s)", folder, reason)
        return build_index(conn, spec, dim), "rebuilt", replayed, reason
    return index, "replayed" if replayed else "loaded", replayed, reason


HELD = "EXISTS (SELECT 1 FROM changes c WHERE c.photo_id = photos.id AND c.op = 'add' AND c.seq <= ?)"
"""A row the snapshot of sequence ? holds (some vector of it): a later sequence of the row is a replaced vector."""


def replay(conn: sqlite3.Connection, index: VectorIndex, seq: int, dim: int) -> int:
    """Apply to a snapshot the deletes, adds and replaced vectors the catalogue recorded after its sequence `seq`."""
    gone = [row[0] for row in conn.execute(
        "SELECT DISTINCT d.photo_id FROM changes d JOIN changes a ON a.photo_id = d.photo_id AND a.op = 'add' "
        "WHERE d.op = 'delete' AND d.seq > ? AND a.seq <= ?", (seq, seq))]
    if gone:
        index.remove(np.array(gone, dtype=np.int64))
    changed = 0
    for ids, vectors in Catalogue.vector_chunks(conn, Filter(f"seq > ? AND {HELD}", (seq, seq)), dim):
        index.replace(ids, vectors)
        changed += len(ids)
    for ids, vectors in Catalogue.vector_chunks(conn, Filter(f"seq > ? AND NOT {HELD}", (seq, seq)), dim):
        index.add(ids, vectors)
        changed += len(ids)
    return len(gone) + changed


def disagreement(conn: sqlite3.Connection, index: VectorIndex) -> str | None:
    """None when the index holds exactly the catalogue's ids, once each; else what differs."""
    live = index.live_ids()
    if len(live) > 1 and bool(np.any(live[1:] == live[:-1])):
        return "the index holds some ids twice"
    stored = Catalogue.ids(conn)
    if np.array_equal(live, stored):
        return None
    missing, extra = np.setdiff1d(stored, live).size, np.setdiff1d(live, stored).size
    return f"{missing} catalogue ids missing from the index, {extra} index ids not in the catalogue"


def build_index(conn: sqlite3.Connection, spec: IndexSpec, dim: int) -> VectorIndex:
    """A fresh index of every catalogue vector."""
    index = VectorIndex(spec, dim)
    for ids, vectors in Catalogue.vector_chunks(conn, Filter(), dim):
        index.add(ids, vectors)
    return index
