"""The embedded store's catalogue: the SQLite (WAL) schema, its connections, row reads and metadata filters."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.store.records import PhotoRecord, Prepared, VectorPage, check_times, check_where

SCHEMA_VERSION = 1
CHUNK = 8192
"""Rows read at a time when rebuilding the index or scanning vectors."""

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
CREATE TABLE IF NOT EXISTS model_counts (model_id TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
TALLY_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS tally_add AFTER INSERT ON photos BEGIN
    INSERT INTO model_counts (model_id, n) VALUES (NEW.model_id, 1)
    ON CONFLICT(model_id) DO UPDATE SET n = n + 1; END""",
    """CREATE TRIGGER IF NOT EXISTS tally_delete AFTER DELETE ON photos BEGIN
    UPDATE model_counts SET n = n - 1 WHERE model_id = OLD.model_id; END""",
    """CREATE TRIGGER IF NOT EXISTS tally_move AFTER UPDATE OF model_id ON photos WHEN OLD.model_id != NEW.model_id
    BEGIN UPDATE model_counts SET n = n - 1 WHERE model_id = OLD.model_id;
    INSERT INTO model_counts (model_id, n) VALUES (NEW.model_id, 1)
    ON CONFLICT(model_id) DO UPDATE SET n = n + 1; END""",
)
"""Vectors per model kept by SQLite itself on every write, whoever writes: a process sharing the store reads
another's counts from here in microseconds instead of counting rows."""

Row = tuple[str, str, float]
"""model_id, metadata JSON, added_at"""


@dataclass(frozen=True)
class Filter:
    """A SQL condition on `photos` (empty: none) and its parameters."""

    sql: str = ""
    params: tuple[Any, ...] = ()

    def where(self, prefix: str = " WHERE ") -> str:
        """The condition after `prefix`, or nothing when there is none."""
        return prefix + self.sql if self.sql else ""


class Catalogue:
    """The SQLite file: one writer connection and a pool of read-only ones (the caller does the locking)."""

    def __init__(self, path: Path) -> None:
        """Open `path` in WAL mode with synchronous=FULL (a commit is on disk when it returns)."""
        self.path = Path(path)
        self._pool_lock = threading.Lock()
        self._pool: list[sqlite3.Connection] = []
        self._connections: list[sqlite3.Connection] = []
        self.writer = self._connect(readonly=False)

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._connections.append(conn)
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
        return conn

    def init_schema(self, dim: int, clock: Callable[[], float], folder: Path) -> str:
        """Create or check the schema and the store's dim; returns the store's id."""
        version = int(self.writer.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {version}; this Concord reads up to "
                               f"{SCHEMA_VERSION} (upgrade Concord)")
        with self.transaction() as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            if not conn.execute("SELECT 1 FROM meta WHERE key = 'tallied'").fetchone():  # a store made before them
                conn.execute("DELETE FROM model_counts")
                conn.execute("INSERT INTO model_counts (model_id, n) SELECT model_id, COUNT(*) FROM photos "
                             "GROUP BY model_id")
                conn.execute("INSERT INTO meta (key, value) VALUES ('tallied', '1')")
            for trigger in TALLY_TRIGGERS:
                conn.execute(trigger)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "dim" not in meta:
                meta = {"dim": str(dim), "store": uuid.uuid4().hex, "created_at": repr(clock())}
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        if int(meta["dim"]) != dim:
            raise ValueError(f"the store in {folder} holds {meta['dim']}-dim vectors; it was opened with "
                             f"dim={dim} (a model of another dim needs its own store)")
        return str(meta["store"])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE on the writer; COMMIT on success, ROLLBACK on any error."""
        conn = self.writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def consistent(self) -> Iterator[sqlite3.Connection]:
        """A read transaction on the writer: every statement inside sees the catalogue as of its first read, while
        other processes go on committing (the caller holds the store's write lock)."""
        conn = self.writer
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def pooled(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection from the pool (made when none is free)."""
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._connect(readonly=True)
        try:
            yield conn
        finally:
            with self._pool_lock:
                self._pool.append(conn)

    def close(self) -> None:
        """Close every connection."""
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._pool.clear()

    # ----- rows --------------------------------------------------------------------------------------------

    @staticmethod
    def insert(conn: sqlite3.Connection, photo: Prepared, now: float, has_bytes: bool, seq: int) -> int:
        """Insert a photo's row and its 'add' change under `seq`; returns its new id (inside a transaction)."""
        cursor = conn.execute(
            "INSERT INTO photos (content_hash, model_id, metadata, vector, added_at, has_bytes, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (photo.content_hash, photo.model_id, photo.metadata_json, photo.vector.astype("<f4").tobytes(), now,
             int(has_bytes), seq))
        photo_id = int(cursor.lastrowid or 0)
        conn.execute("INSERT INTO changes (seq, op, photo_id, at) VALUES (?, 'add', ?, ?)", (seq, photo_id, now))
        return photo_id

    @staticmethod
    def delete(conn: sqlite3.Connection, photo_id: int, seq: int, at: float) -> None:
        """Delete a photo's row and record the 'delete' change under `seq` (inside a transaction)."""
        conn.execute("DELETE FROM photos WHERE id = ?", (photo_id,))
        conn.execute("INSERT INTO changes (seq, op, photo_id, at) VALUES (?, 'delete', ?, ?)", (seq, photo_id, at))

    @staticmethod
    def replace(conn: sqlite3.Connection, photo_id: int, vector: np.ndarray, model_id: str, seq: int,
                at: float) -> None:
        """Give a photo a new vector and model under `seq`, logged as a new 'add' of its id (inside a transaction):
        replaying the log after a snapshot older than `seq` swaps the vector the snapshot holds."""
        conn.execute("UPDATE photos SET vector = ?, model_id = ?, seq = ? WHERE id = ?",
                     (vector.astype("<f4").tobytes(), model_id, seq, photo_id))
        conn.execute("INSERT INTO changes (seq, op, photo_id, at) VALUES (?, 'add', ?, ?)", (seq, photo_id, at))

    @staticmethod
    def set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
        """Insert or replace a setting (inside a transaction)."""
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    @staticmethod
    def setting(conn: sqlite3.Connection, key: str) -> str | None:
        """A setting's value, or None."""
        row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def max_seq(conn: sqlite3.Connection) -> int:
        """The highest catalogue sequence (0 for a new store)."""
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    @staticmethod
    def counts(conn: sqlite3.Connection) -> dict[str, int]:
        """Rows per model id."""
        return {str(m): int(n) for m, n in conn.execute("SELECT model_id, COUNT(*) FROM photos GROUP BY model_id")}

    @staticmethod
    def tallies(conn: sqlite3.Connection) -> dict[str, int]:
        """Rows per model id as the triggers keep them (models with none left out)."""
        return {str(m): int(n) for m, n in conn.execute("SELECT model_id, n FROM model_counts WHERE n > 0")}

    @staticmethod
    def kept_hashes(conn: sqlite3.Connection, shard: str) -> set[str]:
        """The content hashes starting with `shard` whose bytes are kept."""
        return {str(h) for (h,) in conn.execute(
            "SELECT content_hash FROM photos WHERE has_bytes = 1 AND content_hash >= ? AND content_hash < ?",
            (shard, shard + "g"))}

    @staticmethod
    def owner(conn: sqlite3.Connection, photo_id: int) -> tuple[str, str, bool] | None:
        """(content hash, model id, has bytes) of a photo, or None."""
        row = conn.execute("SELECT content_hash, model_id, has_bytes FROM photos WHERE id = ?",
                           (photo_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), bool(row[2]))

    @staticmethod
    def vector(conn: sqlite3.Connection, photo_id: int) -> np.ndarray | None:
        """A photo's stored vector as float32, or None."""
        row = conn.execute("SELECT vector FROM photos WHERE id = ?", (photo_id,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    # ----- reads -------------------------------------------------------------------------------------------

    @staticmethod
    def vector_chunks(conn: sqlite3.Connection, filt: Filter, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of the rows passing `filt`, by id, CHUNK rows at a time."""
        cursor = conn.execute(f"SELECT id, vector FROM photos{filt.where()} ORDER BY id", filt.params)
        while rows := cursor.fetchmany(CHUNK):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
            yield ids, vectors.astype(np.float32)

    @staticmethod
    def stale_page(conn: sqlite3.Connection, model_id: str, after: int, limit: int, dim: int) -> VectorPage:
        """Up to `limit` photos with id above `after` whose vector another model than `model_id` made, by id."""
        rows = conn.execute("SELECT id, model_id, vector, has_bytes FROM photos WHERE id > ? AND model_id != ? "
                            "ORDER BY id LIMIT ?", (after, model_id, limit)).fetchall()
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), dim)
        return VectorPage(np.array([r[0] for r in rows], dtype=np.int64), [str(r[1]) for r in rows],
                          vectors.astype(np.float32), np.array([bool(r[3]) for r in rows], dtype=bool))

    @staticmethod
    def rows(conn: sqlite3.Connection, ids: list[int], filt: Filter) -> dict[int, Row]:
        """Catalogue rows of these ids that pass `filt` (a deleted id has none)."""
        if not ids:
            return {}
        cursor = conn.execute("SELECT id, model_id, metadata, added_at FROM photos "
                              f"WHERE id IN (SELECT value FROM json_each(?)){filt.where(' AND ')}",
                              (json.dumps(ids), *filt.params))
        return {int(r[0]): (str(r[1]), str(r[2]), float(r[3])) for r in cursor}

    @staticmethod
    def record(conn: sqlite3.Connection, condition: str, value: Any) -> PhotoRecord | None:
        """The one row matching `condition` (a trusted SQL fragment with one parameter), or None."""
        row = conn.execute("SELECT id, content_hash, model_id, metadata, added_at, has_bytes FROM photos "
                           f"WHERE {condition}", (value,)).fetchone()
        if row is None:
            return None
        return PhotoRecord(int(row[0]), str(row[1]), str(row[2]), json.loads(row[3]), float(row[4]), bool(row[5]))

    @staticmethod
    def ids(conn: sqlite3.Connection) -> np.ndarray:
        """Every photo id, sorted."""
        return np.fromiter((r[0] for r in conn.execute("SELECT id FROM photos ORDER BY id")), dtype=np.int64)

    @staticmethod
    def scan(conn: sqlite3.Connection, query: np.ndarray, need: int, filt: Filter,
             dim: int) -> list[tuple[float, int]]:
        """Exact top `need` over the rows passing `filt`, computed from the catalogue's vectors."""
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for ids, vectors in Catalogue.vector_chunks(conn, filt, dim):
            ids, scores = np.concatenate([best_ids, ids]), np.concatenate([best_scores, vectors @ query])
            order = np.lexsort((ids, -scores))[:need]
            best_ids, best_scores = ids[order], scores[order]
        return list(zip(best_scores.tolist(), best_ids.tolist(), strict=True))


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


def recorded_settings(folder: Path) -> tuple[bool, dict[str, str]]:
    """(whether the store holds any photo, its settings), read without opening it (both empty for no store)."""
    path = Path(folder) / "catalog.sqlite"
    if not path.exists():
        return False, {}
    with closing(sqlite3.connect(path, timeout=30.0)) as conn:
        try:
            photos = conn.execute("SELECT EXISTS (SELECT 1 FROM photos)").fetchone()
            settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
        except sqlite3.OperationalError:  # created but never initialised
            return False, {}
    return bool(photos[0]), {str(k): str(v) for k, v in settings.items()}


_JSON_TYPES = {True: "'true'", False: "'false'"}


def where_conditions(where: Mapping[str, Any] | None) -> list[tuple[str, tuple[Any, ...]]]:
    """SQL conditions for metadata equality filters, typed as JSON is (True is not 1, "1" is not 1)."""
    conditions: list[tuple[str, tuple[Any, ...]]] = []
    member = "SELECT 1 FROM json_each(photos.metadata) AS m WHERE m.key = ?"
    for key, value in check_where(where).items():
        if value is None:
            conditions.append((f"NOT EXISTS ({member} AND m.type != 'null')", (key,)))
        elif isinstance(value, bool):
            conditions.append((f"EXISTS ({member} AND m.type = {_JSON_TYPES[value]})", (key,)))
        elif isinstance(value, int | float):
            conditions.append((f"EXISTS ({member} AND m.type IN ('integer', 'real') AND m.atom = ?)", (key, value)))
        else:
            conditions.append((f"EXISTS ({member} AND m.type = 'text' AND m.atom = ?)", (key, value)))
    return conditions


def time_conditions(after: float | None, before: float | None) -> list[tuple[str, tuple[Any, ...]]]:
    """SQL conditions for `after <= added_at < before` (either bound may be None)."""
    low, high = check_times(after, before)
    conditions: list[tuple[str, tuple[Any, ...]]] = []
    if low is not None:
        conditions.append(("added_at >= ?", (low,)))
    if high is not None:
        conditions.append(("added_at < ?", (high,)))
    return conditions


def lock_folder(folder: Path, shared: bool = False) -> int:
    """Hold a flock on `folder/.lock` (dropped by the OS when the process dies): exclusive for a store one process
    owns, shared for the processes of one multi-worker server (none of which may open while another owns it)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"the gallery store in {folder} is already open (in this or another process); "
                           f"one store per folder") from None
    return fd


@contextmanager
def writing_folder(fd: int) -> Iterator[None]:
    """Hold the exclusive flock of `fd` (a store's `.write-lock`) while one process of a shared store writes."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def store_held(folder: Path) -> bool:
    """Whether another process holds the store in `folder` now (its lock is taken); a probe, not a lock."""
    if not (folder / ".lock").exists():
        return False
    try:
        fd = lock_folder(folder)
    except RuntimeError:
        return True
    os.close(fd)
    return False
