"""Concord's embedded gallery store: SQLite (WAL) holds the catalogue and is the truth; FAISS is a rebuildable cache.

Files under `folder`:
    catalog.sqlite (-wal, -shm)  photos (id, sha256, metadata JSON, vector blob, model id, added_at, sequence),
                                 the change log (one catalogue sequence per add, delete and replaced vector), settings
    index.faiss                  FAISS snapshot with the highest catalogue sequence it holds (atomic, checksummed)
    photos/ab/cdef...            photo bytes by sha256 (atomic files)
    .lock                        flock: one open store per folder (another open raises), or shared by the worker
                                 processes of one server (`shared=True`)
    .write-lock                  flock: the one writing process of a shared store

Write order, so that a SIGKILL at any moment loses no acknowledged write and leaves nothing inconsistent:
    add:    bytes (tmp, fsync, rename, fsync dir) -> SQLite commit (synchronous=FULL) -> FAISS (memory)
    delete: SQLite commit -> FAISS (memory) -> unlink the bytes
    replace (a backfill): SQLite commit of the new vectors and model ids, each under a new sequence logged as an
            'add' of its id -> FAISS (memory); a replay swaps the vector a snapshot older than that holds
At open the store removes temporary files and bytes no row references, loads the snapshot and replays the
adds, deletes and replaced vectors with a higher sequence (rebuilding from SQLite when the snapshot is missing,
corrupt or made for another dim or index kind), then proves that FAISS and SQLite hold the same ids (rebuilding
if not).

Ids are never reused (AUTOINCREMENT), a row changes only by a backfill's replaced vector and model id, and a
content hash is stored once.
Thread safety: a readers/writer lock; searches and reads run together, adds/deletes/replacements/settings one at a time.

Shared (several worker processes of one server, each with its own FAISS copy): a write holds `.write-lock` too,
and every write and every search first replays what the others committed since this process last looked (one
indexed SQLite read when nothing changed), so an acknowledged write is seen by the next search on any worker.
Only an exclusive open cleans up after a crash: a shared one never removes files another worker may be writing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic import fsync_dir, remove_tmp_files
from server.rwlock import RWLock
from server.store.blobs import BlobStore
from server.store.catalogue import Catalogue, Filter, lock_folder, time_conditions, where_conditions, writing_folder
from server.store.ranking import ranked_rows
from server.store.records import (
    AddResult,
    Hit,
    NewPhoto,
    PhotoRecord,
    Prepared,
    Recovery,
    Replacement,
    VectorPage,
    check_paging,
    check_replacements,
    check_setting,
    check_vector,
    in_upload_order,
    prepare,
    wanted_models,
)
from server.store.recovery import SNAPSHOT_EVERY, PeriodicSnapshots, build_index, load_index, replay
from server.vector_index import IndexSpec, VectorIndex

log = logging.getLogger("concord.store")

SCAN_AFTER = 4096
"""A filtered search ranks at most max(this, 16 x (k+offset)) FAISS results before it scans the matching rows."""
FLAT = IndexSpec("flat")


class GalleryStore:
    """Photos, their vectors (one per photo, with the model that made it) and settings, durable and searchable."""

    remote = False

    def __init__(self, folder: Path, dim: int, index: IndexSpec = FLAT, keep_bytes: bool = True,
                 *, clock: Callable[[], float] = time.time, snapshot_every: int = SNAPSHOT_EVERY,
                 shared: bool = False) -> None:
        """Open (or create) the store in `folder` for `dim`-dim vectors and recover from any crash.

        `clock` gives the `added_at` timestamps (unix seconds); tests pass their own. `shared`: one of several
        processes serving this folder together (see the module); open it exclusively once before, to recover.
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.folder = Path(folder)
        self.dim = dim
        self.spec = index if isinstance(index, IndexSpec) else IndexSpec(str(index))
        self.keep_bytes = keep_bytes
        self.shared = shared
        self.scan_after = SCAN_AFTER
        self._clock = clock
        self._db_path = self.folder / "catalog.sqlite"
        self._snapshot_path = self.folder / "index.faiss"
        self._photos = self.folder / "photos"
        self._lock = RWLock()
        self._save_mutex = threading.Lock()
        self._snapshots = PeriodicSnapshots(snapshot_every, lambda: self._save(blocking=False), self.folder)
        self._catalogue: Catalogue | None = None
        self._blobs: BlobStore | None = None
        self._closed = False
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = lock_folder(self.folder, shared)
        self._write_fd: int | None = os.open(self.folder / ".write-lock", os.O_RDWR | os.O_CREAT, 0o644) if shared \
            else None
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # ----- opening and recovery ----------------------------------------------------------------------------

    def _open(self) -> None:
        tmp_removed = 0 if self.shared else len(remove_tmp_files(self.folder))
        self._blobs = BlobStore(self._photos)
        self._catalogue = Catalogue(self._db_path)
        self._writer = self._catalogue.writer
        self._store_id = self._catalogue.init_schema(self.dim, self._clock, self.folder)
        fsync_dir(self.folder)  # the catalogue file's own directory entry is durable too
        orphans = 0
        if not self.shared:  # photo files no row references: bytes written before a commit that a crash prevented
            orphans = self._blob_store().remove_orphans(lambda shard: Catalogue.kept_hashes(self._writer, shard))
        with self._catalogue.consistent():  # other workers may commit meanwhile
            self._seq = Catalogue.max_seq(self._writer)
            self._counts: Counter[str] = Counter(Catalogue.tallies(self._writer))
            state, replayed, reason = self._open_index()
        self.recovery = Recovery(state, replayed, reason, tmp_removed, orphans)
        if tmp_removed or orphans:
            log.info("store %s: removed %d temporary files and %d unreferenced photo files left by a crash",
                     self.folder, tmp_removed, orphans)

    def _open_index(self) -> tuple[str, int, str | None]:
        """Load the snapshot and bring it up to date, or rebuild; returns (state, changes replayed, reason)."""
        self._index, state, replayed, reason = load_index(self._writer, self.spec, self.dim, self._store_id,
                                                          self._snapshot_path, self._seq, self.folder)
        self._index_seq = self._seq
        self._saved_seq = self._seq if state == "loaded" else -1
        if state != "loaded":
            self._write_snapshot()
        return state, replayed, reason

    # ----- plumbing ----------------------------------------------------------------------------------------

    def _transaction(self) -> Any:
        assert self._catalogue is not None
        return self._catalogue.transaction()

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """The shared lock and a pooled read-only connection."""
        with self._lock.read():
            self._check_open()
            assert self._catalogue is not None
            with self._catalogue.pooled() as conn:
                yield conn

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the gallery store in {self.folder} is closed")

    def _blob_store(self) -> BlobStore:
        assert self._blobs is not None
        return self._blobs

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The write lock (and a shared store's `.write-lock`), with the index level with every commit."""
        with self._lock.write():
            self._check_open()
            if self._write_fd is None:
                yield
                return
            with writing_folder(self._write_fd):
                self._follow()
                yield

    def _catch_up(self) -> None:
        """A shared store: replay what other workers committed since this one last looked (a no-op otherwise)."""
        if not self.shared or self._closed:
            return
        assert self._catalogue is not None
        with self._catalogue.pooled() as conn:
            latest = Catalogue.max_seq(conn)
        if latest != self._index_seq:
            with self._lock.write():
                self._check_open()
                self._follow()

    def _follow(self) -> None:
        """Apply the catalogue's changes after the index's sequence to FAISS and the counts (write lock held)."""
        assert self._catalogue is not None
        with self._catalogue.consistent() as conn:
            latest = Catalogue.max_seq(conn)
            if latest == self._index_seq:
                return
            try:
                replay(conn, self._index, self._index_seq, self.dim)
            except Exception:
                log.exception("store %s: replaying other workers' changes failed; rebuilding the index", self.folder)
                self._index = build_index(conn, self.spec, self.dim)
            self._counts = Counter(Catalogue.tallies(conn))
            self._seq = self._index_seq = latest

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _update_index(self, change: Callable[[VectorIndex], None], seq: int) -> None:
        """Apply a committed change to FAISS; if FAISS fails, rebuild it from the catalogue (which has it)."""
        try:
            change(self._index)
        except Exception:
            log.exception("store %s: FAISS update failed after the commit; rebuilding the index", self.folder)
            self._index = build_index(self._writer, self.spec, self.dim)
        self._index_seq = seq

    # ----- writes ------------------------------------------------------------------------------------------

    def add(self, photos: Sequence[NewPhoto]) -> list[AddResult]:
        """Store photos in one transaction, durable when this returns; a photo whose hash is stored is not stored
        again (`duplicate`, also for a repeat within `photos`). Every photo is checked before anything is written:
        a bad one raises ValueError and nothing is stored."""
        prepared = [prepare(i, photo, self.dim) for i, photo in enumerate(photos)]
        if not prepared:
            return []
        with self._writing():
            conn = self._writer
            known: dict[str, AddResult] = {}
            fresh: list[Prepared] = []
            for p in prepared:
                if p.content_hash in known:
                    continue
                row = conn.execute("SELECT id, model_id FROM photos WHERE content_hash = ?",
                                   (p.content_hash,)).fetchone()
                if row is not None:
                    known[p.content_hash] = AddResult(int(row[0]), str(row[1]), True)
                else:
                    known[p.content_hash] = AddResult(0, p.model_id, False)  # id filled after the insert
                    fresh.append(p)
            if fresh:
                self._insert(fresh, known)
            return in_upload_order(prepared, known)

    def _insert(self, fresh: list[Prepared], known: dict[str, AddResult]) -> None:
        """Write bytes, commit the rows, then add to FAISS (the caller holds the write lock)."""
        blobs = [(p.content_hash, p.data) for p in fresh if self.keep_bytes and p.data is not None]
        kept = {h for h, _ in blobs}
        now = float(self._clock())
        start_seq = self._seq
        ids = []
        try:
            self._blob_store().write(blobs)
            with self._transaction() as conn:
                for p in fresh:
                    ids.append(Catalogue.insert(conn, p, now, p.content_hash in kept, self._next_seq()))
        except BaseException:
            self._seq = start_seq
            self._blob_store().remove(kept)  # not referenced by any row; harmless, but tidy up now
            raise
        vectors = np.stack([p.vector for p in fresh])
        self._update_index(lambda index: index.add(np.array(ids, dtype=np.int64), vectors), self._seq)
        for p, photo_id in zip(fresh, ids, strict=True):
            known[p.content_hash] = AddResult(photo_id, p.model_id, False)
            self._counts[p.model_id] += 1
        self._snapshots.changed(self._index_seq - max(self._saved_seq, 0))

    def delete(self, photo_id: int) -> bool:
        """Remove a photo's row, vector and bytes; False when no photo has this id."""
        with self._writing():
            row = Catalogue.owner(self._writer, int(photo_id))
            if row is None:
                return False
            content_hash, model_id, has_bytes = row
            start_seq = self._seq
            try:
                with self._transaction() as conn:
                    seq = self._next_seq()
                    Catalogue.delete(conn, int(photo_id), seq, float(self._clock()))
            except BaseException:
                self._seq = start_seq
                raise
            self._update_index(lambda index: index.remove(np.array([photo_id], dtype=np.int64)), seq)
            self._counts[model_id] -= 1
            if has_bytes:  # a hash is stored once, so no other row references these bytes
                self._blob_store().remove([content_hash])
            return True

    def replace_vectors(self, model_id: str, replacements: Sequence[Replacement]) -> list[int]:
        """Swap photos' vectors for `model_id`'s in one transaction, then in FAISS; a photo deleted or no longer
        holding its `expected_model` is left alone (a second backfill never writes twice). The ids swapped."""
        checked = check_replacements(replacements, model_id, self.dim)
        with self._writing():
            start_seq = self._seq
            swapped: list[Replacement] = []
            try:
                with self._transaction() as conn:
                    now = float(self._clock())
                    for r in checked:
                        row = Catalogue.owner(conn, r.photo_id)
                        if row is not None and row[1] == r.expected_model:
                            Catalogue.replace(conn, r.photo_id, r.vector, model_id, self._next_seq(), now)
                            swapped.append(r)
            except BaseException:
                self._seq = start_seq
                raise
            if swapped:
                ids = np.array([r.photo_id for r in swapped], dtype=np.int64)
                vectors = np.stack([r.vector for r in swapped])
                self._update_index(lambda index: index.replace(ids, vectors), self._seq)
                self._counts.subtract(r.expected_model for r in swapped)
                self._counts[model_id] += len(swapped)
                self._snapshots.changed(self._index_seq - max(self._saved_seq, 0))
            return [r.photo_id for r in swapped]

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting durably (e.g. the active indexing model)."""
        check_setting(key, value)
        with self._writing(), self._transaction() as conn:
            Catalogue.set_setting(conn, key, value)

    # ----- reads -------------------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        """A stored setting, or None."""
        with self._reading() as conn:
            return Catalogue.setting(conn, key)

    def get(self, photo_id: int) -> PhotoRecord | None:
        """The photo's catalogue record, or None."""
        return self._record("id = ?", int(photo_id))

    def find_by_hash(self, content_hash: str) -> PhotoRecord | None:
        """The record of the photo with this sha256, or None."""
        return self._record("content_hash = ?", str(content_hash).lower())

    def _record(self, condition: str, value: object) -> PhotoRecord | None:
        with self._reading() as conn:
            return Catalogue.record(conn, condition, value)

    def photo_bytes(self, photo_id: int) -> bytes | None:
        """The photo's bytes; None when there is no such photo or its bytes were not kept."""
        with self._reading() as conn:
            row = Catalogue.owner(conn, int(photo_id))
            if row is None or not row[2]:
                return None
            data = self._blob_store().read(row[0])
            if data is None:
                log.error("store %s: the bytes of photo %s (sha256 %s) are missing", self.folder, photo_id, row[0])
            return data

    def vector(self, photo_id: int) -> np.ndarray | None:
        """The photo's stored vector (float32 [dim]), from the catalogue."""
        with self._reading() as conn:
            return Catalogue.vector(conn, int(photo_id))

    def stale_pages(self, model_id: str, page: int = 1024) -> Iterator[VectorPage]:
        """The photos whose vector another model than `model_id` made, `page` at a time by id (the read lock is
        taken per page, so writes go on between pages)."""
        after = -1
        while True:
            with self._reading() as conn:
                found = Catalogue.stale_page(conn, model_id, after, page, self.dim)
            if not len(found.ids):
                return
            yield found
            after = int(found.ids[-1])

    def counts(self) -> dict[str, int]:
        """Vectors per model id (models with none left out)."""
        self._catch_up()
        with self._lock.read():
            return {model: n for model, n in sorted(self._counts.items()) if n > 0}

    def __len__(self) -> int:
        self._catch_up()
        with self._lock.read():
            return sum(self._counts.values())

    @property
    def sequence(self) -> int:
        """The catalogue sequence: it grows by one per photo added, per photo deleted and per vector replaced."""
        self._catch_up()
        with self._lock.read():
            return self._seq

    def catalogue_ids(self) -> list[int]:
        """Every photo id in SQLite, sorted (diagnostics: compare with `index_ids`)."""
        with self._reading() as conn:
            return Catalogue.ids(conn).tolist()

    def index_ids(self) -> list[int]:
        """Every id a FAISS search can return, sorted (diagnostics)."""
        self._catch_up()
        with self._lock.read():
            self._check_open()
            return self._index.live_ids().tolist()

    # ----- search ------------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int = 10, offset: int = 0, models: Collection[str] | None = None,
               where: Mapping[str, Any] | None = None, added_after: float | None = None,
               added_before: float | None = None) -> list[Hit]:
        """The gallery photos nearest to a unit `query` vector, best first: ranks offset .. offset+k-1.

        Filters: `models` keeps only vectors made by these model ids; `where` keeps photos whose metadata field
        equals each value (top-level fields; str, number, bool or None, where None also matches a missing
        field; True is not 1); `added_after <= added_at < added_before` (unix seconds).
        FAISS results are over-fetched and filtered until k+offset pass or the index is exhausted; a filter
        so selective that this would run long is answered by an exact scan of the matching rows instead.
        """
        vector = check_vector(query, self.dim, "the query vector")
        check_paging(k, offset)
        wanted = wanted_models(models)
        conditions = where_conditions(where) + time_conditions(added_after, added_before)
        need = k + offset
        self._catch_up()
        with self._reading() as conn:
            present = {m for m, n in self._counts.items() if n > 0}
            if k == 0 or not present or (wanted is not None and not wanted & present):
                return []
            if wanted is not None and not present <= wanted:
                conditions.insert(0, ("model_id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(wanted)),)))
            filt = Filter(" AND ".join(c for c, _ in conditions), tuple(v for _, p in conditions for v in p))
            ranked, rows = ranked_rows(conn, self._index, vector, need, filt, self.dim, self.scan_after)
        hits = []
        for score, photo_id in ranked[offset:need]:
            model_id, metadata, added_at = rows[photo_id]
            hits.append(Hit(photo_id, score, model_id, json.loads(metadata), added_at))
        return hits

    # ----- snapshot and closing ----------------------------------------------------------------------------

    def save_index(self) -> None:
        """Write the FAISS snapshot atomically, with the catalogue sequence it holds (searches go on meanwhile)."""
        self._save(blocking=True)

    def wait_for_snapshot(self) -> None:
        """Wait until a background snapshot in progress is written (benchmarks and tests)."""
        self._snapshots.wait()

    def _save(self, blocking: bool) -> None:
        if not self._save_mutex.acquire(blocking=blocking):
            return  # a save or the close is under way already
        try:
            with self._lock.read():
                self._check_open()
                snapshot, seq = self._index.snapshot(self._index_seq, self._store_id), self._index_seq
            snapshot.write(self._snapshot_path)
            self._saved_seq = seq
        finally:
            self._save_mutex.release()

    def _write_snapshot(self) -> None:
        """Write the snapshot now (the caller holds the write lock or is opening the store)."""
        self._index.snapshot(self._index_seq, self._store_id).write(self._snapshot_path)
        self._saved_seq = self._index_seq

    def close(self) -> None:
        """Save the index (when it changed since the last snapshot) and close; closing twice is harmless."""
        self._snapshots.close()
        with self._save_mutex, self._lock.write():
            if self._closed:
                return
            try:
                if self._saved_seq != self._index_seq:
                    self._write_snapshot()
                self._writer.execute(f"PRAGMA wal_checkpoint({'PASSIVE' if self.shared else 'TRUNCATE'})")
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        if self._catalogue is not None:
            self._catalogue.close()
        if self._blobs is not None:
            self._blobs.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


