"""Concord's embedded gallery store: SQLite (WAL) holds the catalogue and is the truth; FAISS is a rebuildable cache.

Files under `folder`:
    catalog.sqlite (-wal, -shm)  photos (id, sha256, metadata JSON, vector blob, model id, added_at, sequence),
                                 the change log (one catalogue sequence per add and per delete), settings
    index.faiss                  FAISS snapshot with the highest catalogue sequence it holds (atomic, checksummed)
    photos/ab/cdef...            photo bytes by sha256 (atomic files)
    .lock                        flock: one open store per folder (another open raises)

Write order, so that a SIGKILL at any moment loses no acknowledged write and leaves nothing inconsistent:
    add:    bytes (tmp, fsync, rename, fsync dir) -> SQLite commit (synchronous=FULL) -> FAISS (memory)
    delete: SQLite commit -> FAISS (memory) -> unlink the bytes
At open the store removes temporary files and bytes no row references, loads the snapshot and replays the
adds and deletes with a higher sequence (rebuilding from SQLite when the snapshot is missing, corrupt or made
for another dim or index kind), then proves that FAISS and SQLite hold the same ids (rebuilding if not).

Ids are never reused (AUTOINCREMENT), rows are immutable, and a content hash is stored once.
Thread safety: a readers/writer lock; searches and reads run together, adds/deletes/settings one at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic import fsync_dir, remove_tmp_files, write_atomic
from server.rwlock import RWLock
from server.vector_index import IndexSpec, SnapshotError, SnapshotMissing, VectorIndex, read_snapshot

__all__ = ["AddResult", "GalleryStore", "Hit", "IndexSpec", "NewPhoto", "PhotoRecord", "Recovery"]

log = logging.getLogger("concord.store")

NORM_TOLERANCE = 1e-3
"""A stored or query vector must have L2 norm 1 within this much."""
SCHEMA_VERSION = 1
CHUNK = 8192
"""Rows read at a time when rebuilding the index or scanning vectors."""
SCAN_AFTER = 4096
"""A filtered search ranks at most max(this, 16 x (k+offset)) FAISS results before it scans the matching rows."""
COMPACT_SHARE = 0.25
IO_THREADS = 8
SNAPSHOT_EVERY = 1000
"""Changes after which an add writes a fresh FAISS snapshot in the background (0: only at shutdown), so a crash
after long uptime replays at most about this many changes at the next start."""
"""Threads that write and fsync photo files of one add concurrently."""
"""An HNSW index whose tombstones pass this share of its entries is rebuilt at open."""
_HASH = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT    NOT NULL UNIQUE,
    model_id     TEXT    NOT NULL,
    metadata     TEXT    NOT NULL,
    vector       BLOB    NOT NULL,
    added_at     REAL    NOT NULL,
    has_bytes    INTEGER NOT NULL,
    seq          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_seq ON photos(seq);
CREATE INDEX IF NOT EXISTS photos_model ON photos(model_id);
CREATE INDEX IF NOT EXISTS photos_added ON photos(added_at);
CREATE TABLE IF NOT EXISTS changes (
    seq      INTEGER PRIMARY KEY,
    op       TEXT    NOT NULL CHECK (op IN ('add', 'delete')),
    photo_id INTEGER NOT NULL,
    at       REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_photo ON changes(photo_id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class NewPhoto:
    """A photo to store: its sha256, its embedding and the model that made it, metadata and (optionally) bytes."""

    content_hash: str
    vector: np.ndarray
    model_id: str
    metadata: dict[str, Any]
    data: bytes | None = None


@dataclass(frozen=True)
class PhotoRecord:
    """A stored photo's catalogue row (without its vector and bytes)."""

    id: int
    content_hash: str
    model_id: str
    metadata: dict[str, Any]
    added_at: float
    has_bytes: bool


@dataclass(frozen=True)
class AddResult:
    """The id a photo is stored under; `duplicate` when its content hash was stored already (nothing written)."""

    id: int
    model_id: str
    duplicate: bool


@dataclass(frozen=True)
class Hit:
    """One search result: a photo, its inner-product score with the query, and its catalogue fields."""

    id: int
    score: float
    model_id: str
    metadata: dict[str, Any]
    added_at: float


@dataclass(frozen=True)
class Recovery:
    """What opening the store found and did. `index`: "loaded" (snapshot current), "replayed" or "rebuilt"."""

    index: str
    replayed: int
    reason: str | None
    tmp_removed: int
    orphans_removed: int


@dataclass(frozen=True)
class _Prepared:
    content_hash: str
    vector: np.ndarray
    model_id: str
    metadata_json: str
    data: bytes | None


@dataclass(frozen=True)
class _Filter:
    """A SQL condition on `photos` (empty: none) and its parameters."""

    sql: str = ""
    params: tuple[Any, ...] = ()

    def where(self, prefix: str = " WHERE ") -> str:
        return prefix + self.sql if self.sql else ""


_Row = tuple[str, str, float]  # model_id, metadata JSON, added_at


FLAT = IndexSpec("flat")


class GalleryStore:
    """Photos, their vectors (one per photo, with the model that made it) and settings, durable and searchable."""

    def __init__(self, folder: Path, dim: int, index: IndexSpec = FLAT, keep_bytes: bool = True,
                 *, clock: Callable[[], float] = time.time, snapshot_every: int = SNAPSHOT_EVERY) -> None:
        """Open (or create) the store in `folder` for `dim`-dim vectors and recover from any crash.

        `clock` gives the `added_at` timestamps (unix seconds); tests pass their own.
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.folder = Path(folder)
        self.dim = dim
        self.spec = index if isinstance(index, IndexSpec) else IndexSpec(str(index))
        self.keep_bytes = keep_bytes
        self.scan_after = SCAN_AFTER
        self.snapshot_every = snapshot_every
        self._snapshotting: Future[None] | None = None
        self._clock = clock
        self._db_path = self.folder / "catalog.sqlite"
        self._snapshot_path = self.folder / "index.faiss"
        self._photos = self.folder / "photos"
        self._lock = RWLock()
        self._save_mutex = threading.Lock()
        self._pool_lock = threading.Lock()
        self._pool: list[sqlite3.Connection] = []
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="concord-store-io")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_folder(self.folder)
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # ----- opening and recovery ----------------------------------------------------------------------------

    def _open(self) -> None:
        tmp_removed = len(remove_tmp_files(self.folder))
        if not self._photos.is_dir():
            self._photos.mkdir()
            fsync_dir(self.folder)
        self._writer = self._connect(readonly=False)
        self._init_schema()
        fsync_dir(self.folder)  # the catalogue file's own directory entry is durable too
        self._seq = int(self._writer.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
        self._counts: Counter[str] = Counter(dict(self._writer.execute(
            "SELECT model_id, COUNT(*) FROM photos GROUP BY model_id").fetchall()))
        orphans = self._remove_orphan_blobs()
        state, replayed, reason = self._open_index()
        self.recovery = Recovery(state, replayed, reason, tmp_removed, orphans)
        if tmp_removed or orphans:
            log.info("store %s: removed %d temporary files and %d unreferenced photo files left by a crash",
                     self.folder, tmp_removed, orphans)

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self._db_path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
        self._connections.append(conn)
        return conn

    def _init_schema(self) -> None:
        version = int(self._writer.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self._db_path} has schema version {version}; this Concord reads up to "
                               f"{SCHEMA_VERSION} (upgrade Concord)")
        with self._transaction() as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "dim" not in meta:
                meta = {"dim": str(self.dim), "store": uuid.uuid4().hex, "created_at": repr(self._clock())}
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        if int(meta["dim"]) != self.dim:
            raise ValueError(f"the store in {self.folder} holds {meta['dim']}-dim vectors; it was opened with "
                             f"dim={self.dim} (a model of another dim needs its own store)")
        self._store_id = meta["store"]

    def _remove_orphan_blobs(self) -> int:
        """Delete photo files no row references (bytes written before a commit that a crash prevented)."""
        removed = 0
        for shard in sorted(p for p in self._photos.iterdir() if p.is_dir() and _SHARD.fullmatch(p.name)):
            wanted = {h[2:] for (h,) in self._writer.execute(
                "SELECT content_hash FROM photos WHERE has_bytes = 1 AND content_hash >= ? AND content_hash < ?",
                (shard.name, shard.name + "g"))}
            for path in shard.iterdir():
                if path.is_file() and path.name not in wanted:
                    path.unlink()
                    removed += 1
        return removed

    def _open_index(self) -> tuple[str, int, str | None]:
        """Load the snapshot and bring it up to date, or rebuild; returns (state, changes replayed, reason)."""
        index: VectorIndex | None = None
        replayed, reason = 0, None
        try:
            index, seq = read_snapshot(self._snapshot_path, self.spec, self.dim, self._store_id)
        except SnapshotMissing as err:
            reason = str(err)
        except SnapshotError as err:
            reason = str(err)
            log.warning("store %s: ignoring the index snapshot: %s; rebuilding it from the catalogue",
                        self.folder, err)
        if index is not None and seq > self._seq:
            reason = f"the snapshot holds sequence {seq}, beyond the catalogue's {self._seq}"
            index = None
        if index is not None:
            replayed = self._replay(index, seq)
            problem = self._disagreement(index)
            if problem:
                reason = f"after replaying the catalogue the index disagrees with it: {problem}"
                index = None
            elif index.tombstone_share > COMPACT_SHARE:
                reason = f"compacting: {index.tombstone_share:.0%} of the HNSW entries are deleted photos"
                index = None
        if index is None:
            if reason and not reason.startswith("no index snapshot"):
                log.warning("store %s: rebuilding the FAISS index from SQLite (%s)", self.folder, reason)
            index, state = self._build_index(), "rebuilt"
        else:
            state = "replayed" if replayed else "loaded"
        self._index = index
        self._index_seq = self._seq
        self._saved_seq = -1
        if state != "loaded":
            self._write_snapshot()
        else:
            self._saved_seq = self._seq
        return state, replayed, reason

    def _replay(self, index: VectorIndex, seq: int) -> int:
        """Apply to a snapshot the deletes and adds the catalogue recorded after its sequence `seq`."""
        gone = [row[0] for row in self._writer.execute(
            "SELECT d.photo_id FROM changes d JOIN changes a ON a.photo_id = d.photo_id AND a.op = 'add' "
            "WHERE d.op = 'delete' AND d.seq > ? AND a.seq <= ?", (seq, seq))]
        if gone:
            index.remove(np.array(gone, dtype=np.int64))
        added = 0
        for ids, vectors in self._vector_chunks(self._writer, _Filter("seq > ?", (seq,))):
            index.add(ids, vectors)
            added += len(ids)
        return len(gone) + added

    def _disagreement(self, index: VectorIndex) -> str | None:
        """None when the index holds exactly the catalogue's ids, once each; else what differs."""
        live = index.live_ids()
        if len(live) > 1 and bool(np.any(live[1:] == live[:-1])):
            return "the index holds some ids twice"
        stored = self._catalogue_ids(self._writer)
        if np.array_equal(live, stored):
            return None
        missing, extra = np.setdiff1d(stored, live).size, np.setdiff1d(live, stored).size
        return f"{missing} catalogue ids missing from the index, {extra} index ids not in the catalogue"

    def _build_index(self) -> VectorIndex:
        index = VectorIndex(self.spec, self.dim)
        for ids, vectors in self._vector_chunks(self._writer, _Filter()):
            index.add(ids, vectors)
        return index

    def _vector_chunks(self, conn: sqlite3.Connection, filt: _Filter) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = conn.execute(f"SELECT id, vector FROM photos{filt.where()} ORDER BY id", filt.params)
        while rows := cursor.fetchmany(CHUNK):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
            yield ids, vectors.astype(np.float32)

    # ----- plumbing ----------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The shared lock and a pooled read-only connection."""
        with self._lock.read():
            self._check_open()
            with self._pool_lock:
                conn = self._pool.pop() if self._pool else None
            if conn is None:
                conn = self._connect(readonly=True)
            try:
                yield conn
            finally:
                with self._pool_lock:
                    self._pool.append(conn)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the gallery store in {self.folder} is closed")

    def _blob_path(self, content_hash: str) -> Path:
        return self._photos / content_hash[:2] / content_hash[2:]

    def _write_blobs(self, items: list[tuple[str, bytes]]) -> None:
        """Write photo bytes atomically and durably: each file, then each directory it went into (in parallel:
        a disk completes concurrent fsyncs several times faster than one after another)."""
        if not items:
            return
        paths = [self._blob_path(content_hash) for content_hash, _ in items]
        new_shards = {path.parent for path in paths if not path.parent.is_dir()}
        for shard in new_shards:
            shard.mkdir(exist_ok=True)
        list(self._io.map(lambda path, data: write_atomic(path, data, sync_dir=False), paths,
                          [data for _, data in items]))
        folders = {path.parent for path in paths} | ({self._photos} if new_shards else set())
        list(self._io.map(fsync_dir, folders))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _update_index(self, change: Callable[[VectorIndex], None], seq: int) -> None:
        """Apply a committed change to FAISS; if FAISS fails, rebuild it from the catalogue (which has it)."""
        try:
            change(self._index)
        except Exception:
            log.exception("store %s: FAISS update failed after the commit; rebuilding the index", self.folder)
            self._index = self._build_index()
        self._index_seq = seq

    # ----- writes ------------------------------------------------------------------------------------------

    def add(self, photos: Sequence[NewPhoto]) -> list[AddResult]:
        """Store photos in one transaction, durable when this returns; a photo whose hash is stored is not stored
        again (`duplicate`, also for a repeat within `photos`). Every photo is checked before anything is written:
        a bad one raises ValueError and nothing is stored."""
        prepared = [self._prepare(i, photo) for i, photo in enumerate(photos)]
        if not prepared:
            return []
        with self._lock.write():
            self._check_open()
            conn = self._writer
            known: dict[str, AddResult] = {}
            fresh: list[_Prepared] = []
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
            results, first = [], set()
            for p in prepared:
                result = known[p.content_hash]
                if p.content_hash in first and not result.duplicate:
                    result = AddResult(result.id, result.model_id, True)
                first.add(p.content_hash)
                results.append(result)
            return results

    def _insert(self, fresh: list[_Prepared], known: dict[str, AddResult]) -> None:
        """Write bytes, commit the rows, then add to FAISS (the caller holds the write lock)."""
        blobs = [(p.content_hash, p.data) for p in fresh if self.keep_bytes and p.data is not None]
        kept = {h for h, _ in blobs}
        now = float(self._clock())
        start_seq = self._seq
        ids = []
        try:
            self._write_blobs(blobs)
            with self._transaction() as conn:
                for p in fresh:
                    seq = self._next_seq()
                    cursor = conn.execute(
                        "INSERT INTO photos (content_hash, model_id, metadata, vector, added_at, has_bytes, seq) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (p.content_hash, p.model_id, p.metadata_json, p.vector.astype("<f4").tobytes(), now,
                         int(p.content_hash in kept), seq))
                    photo_id = int(cursor.lastrowid or 0)
                    conn.execute("INSERT INTO changes (seq, op, photo_id, at) VALUES (?, 'add', ?, ?)",
                                 (seq, photo_id, now))
                    ids.append(photo_id)
        except BaseException:
            self._seq = start_seq
            for content_hash in kept:  # not referenced by any row; harmless, but tidy up now
                self._blob_path(content_hash).unlink(missing_ok=True)
            raise
        vectors = np.stack([p.vector for p in fresh])
        self._update_index(lambda index: index.add(np.array(ids, dtype=np.int64), vectors), self._seq)
        for p, photo_id in zip(fresh, ids, strict=True):
            known[p.content_hash] = AddResult(photo_id, p.model_id, False)
            self._counts[p.model_id] += 1
        self._maybe_snapshot()

    def _maybe_snapshot(self) -> None:
        """Start a background snapshot once `snapshot_every` changes are not in the last one (one at a time)."""
        due = self.snapshot_every > 0 and self._index_seq - max(self._saved_seq, 0) >= self.snapshot_every
        if due and (self._snapshotting is None or self._snapshotting.done()):
            self._snapshotting = self._io.submit(self._background_save)

    def _background_save(self) -> None:
        try:
            self._save(blocking=False)
        except Exception:  # the next one will try again; the catalogue has every change meanwhile
            if not self._closed:
                log.exception("store %s: the periodic index snapshot failed", self.folder)

    def wait_for_snapshot(self) -> None:
        """Wait until a background snapshot in progress is written (benchmarks and tests)."""
        if self._snapshotting is not None:
            self._snapshotting.result()

    def _prepare(self, position: int, photo: NewPhoto) -> _Prepared:
        """Check one photo completely (no I/O): hash, vector, model id, metadata, bytes matching the hash."""
        name = f"photo #{position}"
        if not isinstance(photo, NewPhoto):
            raise ValueError(f"{name}: expected a NewPhoto, got {type(photo).__name__}")
        content_hash = photo.content_hash.lower() if isinstance(photo.content_hash, str) else ""
        if not _HASH.fullmatch(content_hash):
            raise ValueError(f"{name}: content_hash must be a sha256 hex digest (64 hex digits), "
                             f"got {str(photo.content_hash)[:80]!r}")
        name = f"photo #{position} (sha256 {content_hash[:12]}…)"
        vector = check_vector(photo.vector, self.dim, f"{name}: the vector")
        if not isinstance(photo.model_id, str) or not photo.model_id.strip():
            raise ValueError(f"{name}: model_id must be a non-empty string, got {photo.model_id!r}")
        data = photo.data
        if data is not None:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"{name}: data must be bytes, got {type(data).__name__}")
            data = bytes(data)
            actual = hashlib.sha256(data).hexdigest()
            if actual != content_hash:
                raise ValueError(f"{name}: the bytes hash to sha256 {actual[:12]}…, not the content_hash given")
        return _Prepared(content_hash, vector, photo.model_id, _metadata_json(photo.metadata, name), data)

    def delete(self, photo_id: int) -> bool:
        """Remove a photo's row, vector and bytes; False when no photo has this id."""
        with self._lock.write():
            self._check_open()
            row = self._writer.execute("SELECT content_hash, model_id, has_bytes FROM photos WHERE id = ?",
                                       (int(photo_id),)).fetchone()
            if row is None:
                return False
            content_hash, model_id, has_bytes = row
            start_seq = self._seq
            try:
                with self._transaction() as conn:
                    seq = self._next_seq()
                    conn.execute("DELETE FROM photos WHERE id = ?", (int(photo_id),))
                    conn.execute("INSERT INTO changes (seq, op, photo_id, at) VALUES (?, 'delete', ?, ?)",
                                 (seq, int(photo_id), float(self._clock())))
            except BaseException:
                self._seq = start_seq
                raise
            self._update_index(lambda index: index.remove(np.array([photo_id], dtype=np.int64)), seq)
            self._counts[model_id] -= 1
            if has_bytes:  # a hash is stored once, so no other row references these bytes
                self._blob_path(content_hash).unlink(missing_ok=True)
            return True

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting durably (e.g. the active indexing model)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"a setting key must be a non-empty string, got {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"setting {key!r}: the value must be a string, got {type(value).__name__}")
        with self._lock.write():
            self._check_open()
            with self._transaction() as conn:
                conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # ----- reads -------------------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, photo_id: int) -> PhotoRecord | None:
        return self._record("id = ?", int(photo_id))

    def find_by_hash(self, content_hash: str) -> PhotoRecord | None:
        return self._record("content_hash = ?", str(content_hash).lower())

    def _record(self, condition: str, value: Any) -> PhotoRecord | None:
        with self._reading() as conn:
            row = conn.execute("SELECT id, content_hash, model_id, metadata, added_at, has_bytes FROM photos "
                               f"WHERE {condition}", (value,)).fetchone()
        if row is None:
            return None
        return PhotoRecord(int(row[0]), str(row[1]), str(row[2]), json.loads(row[3]), float(row[4]), bool(row[5]))

    def photo_bytes(self, photo_id: int) -> bytes | None:
        """The photo's bytes; None when there is no such photo or its bytes were not kept."""
        with self._reading() as conn:
            row = conn.execute("SELECT content_hash FROM photos WHERE id = ? AND has_bytes = 1",
                               (int(photo_id),)).fetchone()
            if row is None:
                return None
            try:
                return self._blob_path(str(row[0])).read_bytes()
            except FileNotFoundError:
                log.error("store %s: the bytes of photo %s (sha256 %s) are missing", self.folder, photo_id, row[0])
                return None

    def vector(self, photo_id: int) -> np.ndarray | None:
        """The photo's stored vector (float32 [dim]), from the catalogue."""
        with self._reading() as conn:
            row = conn.execute("SELECT vector FROM photos WHERE id = ?", (int(photo_id),)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def counts(self) -> dict[str, int]:
        """Vectors per model id (models with none left out)."""
        with self._lock.read():
            return {model: n for model, n in sorted(self._counts.items()) if n > 0}

    def __len__(self) -> int:
        with self._lock.read():
            return sum(self._counts.values())

    @property
    def sequence(self) -> int:
        """The catalogue sequence: it grows by one per photo added and per photo deleted."""
        with self._lock.read():
            return self._seq

    def catalogue_ids(self) -> list[int]:
        """Every photo id in SQLite, sorted (diagnostics: compare with `index_ids`)."""
        with self._reading() as conn:
            return self._catalogue_ids(conn).tolist()

    def index_ids(self) -> list[int]:
        """Every id a FAISS search can return, sorted (diagnostics)."""
        with self._lock.read():
            self._check_open()
            return self._index.live_ids().tolist()

    @staticmethod
    def _catalogue_ids(conn: sqlite3.Connection) -> np.ndarray:
        return np.fromiter((r[0] for r in conn.execute("SELECT id FROM photos ORDER BY id")), dtype=np.int64)

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
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        wanted = None if models is None else {models} if isinstance(models, str) else set(models)
        conditions = _where_conditions(where) + _time_conditions(added_after, added_before)
        need = k + offset
        with self._reading() as conn:
            present = {m for m, n in self._counts.items() if n > 0}
            if k == 0 or not present or (wanted is not None and not wanted & present):
                return []
            if wanted is not None and not present <= wanted:
                conditions.insert(0, ("model_id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(wanted)),)))
            filt = _Filter(" AND ".join(c for c, _ in conditions), tuple(v for _, p in conditions for v in p))
            ranked, rows = self._ranked(conn, vector, need, filt)
        hits = []
        for score, photo_id in ranked[offset:need]:
            model_id, metadata, added_at = rows[photo_id]
            hits.append(Hit(photo_id, score, model_id, json.loads(metadata), added_at))
        return hits

    def _ranked(self, conn: sqlite3.Connection, query: np.ndarray, need: int,
                filt: _Filter) -> tuple[list[tuple[float, int]], dict[int, _Row]]:
        """The best `need` (score, id) passing `filt`, and their rows: FAISS over-fetch, else an exact scan."""
        index = self._index
        n = need if not filt.sql and not index.tombstone_share else max(4 * need, 64)
        scan_after = max(16 * need, self.scan_after)
        passed: dict[int, float] = {}
        rows: dict[int, _Row] = {}
        seen: set[int] = set()
        while True:
            found = index.search(query, n)
            fresh = [(float(s), int(i)) for s, i in zip(found.scores, found.ids, strict=True) if int(i) not in seen]
            seen.update(i for _, i in fresh)
            got = self._rows(conn, [i for _, i in fresh], filt)
            rows.update(got)
            passed.update((i, s) for s, i in fresh if i in got)
            if len(passed) >= need or found.asked >= index.ntotal == found.returned:
                break  # enough, or every entry in the index was ranked
            gave_up = found.returned < found.asked  # an ANN index found no more at its search setting
            if gave_up or n >= scan_after:
                if filt.sql:
                    ranked = self._scan(conn, query, need, filt)
                    return ranked, self._rows(conn, [i for _, i in ranked], _Filter())
                if gave_up:
                    break
            n *= 4
        ranked = sorted(((s, i) for i, s in passed.items()), key=lambda t: (-t[0], t[1]))
        return ranked[:need], rows

    def _rows(self, conn: sqlite3.Connection, ids: list[int], filt: _Filter) -> dict[int, _Row]:
        """Catalogue rows of these ids that pass `filt` (a deleted id has none)."""
        if not ids:
            return {}
        cursor = conn.execute("SELECT id, model_id, metadata, added_at FROM photos "
                              f"WHERE id IN (SELECT value FROM json_each(?)){filt.where(' AND ')}",
                              (json.dumps(ids), *filt.params))
        return {int(r[0]): (str(r[1]), str(r[2]), float(r[3])) for r in cursor}

    def _scan(self, conn: sqlite3.Connection, query: np.ndarray, need: int, filt: _Filter) -> list[tuple[float, int]]:
        """Exact top `need` over the rows passing `filt`, computed from the catalogue's vectors."""
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for ids, vectors in self._vector_chunks(conn, filt):
            ids, scores = np.concatenate([best_ids, ids]), np.concatenate([best_scores, vectors @ query])
            order = np.lexsort((ids, -scores))[:need]
            best_ids, best_scores = ids[order], scores[order]
        return list(zip(best_scores.tolist(), best_ids.tolist(), strict=True))

    # ----- snapshot and closing ----------------------------------------------------------------------------

    def save_index(self) -> None:
        """Write the FAISS snapshot atomically, with the catalogue sequence it holds (searches go on meanwhile)."""
        self._save(blocking=True)

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
        with self._save_mutex, self._lock.write():
            if self._closed:
                return
            try:
                if self._saved_seq != self._index_seq:
                    self._write_snapshot()
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._pool.clear()
        self._io.shutdown()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recorded_dim(folder: Path) -> int | None:
    """The vector dim a store folder was created for, or None when it holds no store yet (read without
    opening the store: lets a server refuse a mismatched release before it loads anything)."""
    path = Path(folder) / "catalog.sqlite"
    if not path.exists():
        return None
    with closing(sqlite3.connect(path, timeout=30.0)) as conn:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        except sqlite3.OperationalError:  # created but never initialised
            return None
    return int(row[0]) if row else None


def check_vector(vector: Any, dim: int, what: str) -> np.ndarray:
    """`vector` as a contiguous float32 [dim], or ValueError unless it has `dim` finite values and unit L2 norm."""
    try:
        array = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an array of numbers") from None
    if array.ndim != 1 or array.shape[0] != dim:
        raise ValueError(f"{what} has shape {list(array.shape)}; this store holds {dim}-dim vectors")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{what} holds NaN or infinite values (at positions {bad[:5].tolist()})")
    norm = float(np.linalg.norm(array))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise ValueError(f"{what} has L2 norm {norm:.6f}; vectors must be L2-normalised "
                         f"(unit length within {NORM_TOLERANCE})")
    return np.ascontiguousarray(array, dtype=np.float32)


def _metadata_json(metadata: Any, name: str) -> str:
    if not isinstance(metadata, Mapping) or not all(isinstance(key, str) for key in metadata):
        raise ValueError(f"{name}: metadata must be a JSON object (a dict with string keys)")
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: metadata is not JSON-serialisable ({err})") from None


_JSON_TYPES = {True: "'true'", False: "'false'"}


def _where_conditions(where: Mapping[str, Any] | None) -> list[tuple[str, tuple[Any, ...]]]:
    """SQL conditions for metadata equality filters, typed as JSON is (True is not 1, "1" is not 1)."""
    if where is not None and not isinstance(where, Mapping):
        raise ValueError(f"where must map metadata fields to values, got {type(where).__name__}")
    conditions: list[tuple[str, tuple[Any, ...]]] = []
    member = "SELECT 1 FROM json_each(photos.metadata) AS m WHERE m.key = ?"
    for key, value in (where or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"a where filter names a metadata field by string, got {key!r}")
        if value is None:
            conditions.append((f"NOT EXISTS ({member} AND m.type != 'null')", (key,)))
        elif isinstance(value, bool):
            conditions.append((f"EXISTS ({member} AND m.type = {_JSON_TYPES[value]})", (key,)))
        elif isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError(f"where filter {key!r}: {value} is not a finite number")
            conditions.append((f"EXISTS ({member} AND m.type IN ('integer', 'real') AND m.atom = ?)", (key, value)))
        elif isinstance(value, str):
            conditions.append((f"EXISTS ({member} AND m.type = 'text' AND m.atom = ?)", (key, value)))
        else:
            raise ValueError(f"where filter {key!r}: compare with a string, number, boolean or null, "
                             f"not {type(value).__name__}")
    return conditions


def _time_conditions(after: float | None, before: float | None) -> list[tuple[str, tuple[Any, ...]]]:
    conditions: list[tuple[str, tuple[Any, ...]]] = []
    for name, value, sql in (("added_after", after, "added_at >= ?"), ("added_before", before, "added_at < ?")):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of unix seconds, got {value!r}")
        conditions.append((sql, (float(value),)))
    return conditions


def _lock_folder(folder: Path) -> int:
    """Hold an exclusive flock on `folder/.lock` (dropped by the OS when the process dies)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"the gallery store in {folder} is already open (in this or another process); "
                           f"one store per folder") from None
    return fd


def store_held(folder: Path) -> bool:
    """Whether another process holds the store in `folder` now (its lock is taken); a probe, not a lock."""
    if not (folder / ".lock").exists():
        return False
    try:
        fd = _lock_folder(folder)
    except RuntimeError:
        return True
    os.close(fd)
    return False
