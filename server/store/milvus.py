"""The Milvus gallery backend: the same `Gallery` interface over a Milvus collection (Lite, standalone or cluster).

Milvus is the source of truth for every photo's record and vector: one entity per photo holds its id, the
vector, content hash, model id, metadata (JSON), `added_at` and whether its bytes are kept; a second collection
holds the settings (the active model, the model ids that have vectors). Photo bytes stay content-addressed in a
folder (`BlobStore`), which a deployment puts on shared storage when several API processes serve one gallery.

Ids come from the content hash (52 bits, so JavaScript numbers hold them exactly): the same photo added through
two processes at once lands on one id, and `upsert` by id keeps one entity. Every read and search runs at
`consistency_level="Strong"`, so it sees every write acknowledged before it, by any process.

Write order: bytes (atomic file) -> Milvus upsert (acknowledged: in Milvus's write-ahead log) ; delete: Milvus
delete -> unlink the bytes; replace (a backfill): read the entities, upsert those still holding the expected model
with the new vector and model id (every other field as read). A crash leaves at worst photo files no entity
references, removed at a later open once they are an hour old (younger ones may belong to another process's add in
flight).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from server.store.blobs import BlobStore
from server.store.milvus_client import (
    MilvusUnavailable,
    connect,
    ensure_collections,
    literal,
    milvus_index,
    release_lite,
)
from server.store.records import (
    AddResult,
    Hit,
    NewPhoto,
    PhotoRecord,
    Prepared,
    Replacement,
    VectorPage,
    check_paging,
    check_replacements,
    check_setting,
    check_times,
    check_vector,
    check_where,
    in_upload_order,
    metadata_matches,
    prepare,
    wanted_models,
)
from server.vector_index import IndexSpec

log = logging.getLogger("concord.store")

MAX_WINDOW = 16384
"""Milvus ranks at most this many results per search (k + offset)."""
ORPHAN_AGE = 3600.0
"""Seconds before an unreferenced photo file counts as left by a crash (not another process's add in flight)."""
BATCH = 2000
"""Entities per request when reading many rows."""
FIELDS = ["id", "content_hash", "model_id", "metadata", "added_at", "has_bytes"]
MODEL_PREFIX = "model:"


def hash_ids(content_hash: str) -> list[int]:
    """Candidate ids of a photo, from its sha256: four 52-bit slices, tried in order (a slice of 0 is skipped)."""
    return [v for i in range(4) if (v := int(content_hash[i * 13:(i + 1) * 13], 16))]


class MilvusGallery:
    """A gallery in a Milvus collection `collection` (and `collection`_settings) reached at `uri`."""

    remote = True

    def __init__(self, uri: str, collection: str, dim: int, photos: Path, index: IndexSpec | str = "flat",
                 keep_bytes: bool = True, *, token: str = "", connect_timeout: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        """Connect (retrying for `connect_timeout` seconds: a Milvus restarting after a crash can take a minute),
        create the collections when missing, refuse one made for another dim."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.uri, self.collection, self.dim = uri, collection, dim
        self.settings_collection = f"{collection}_settings"
        self.spec = index if isinstance(index, IndexSpec) else IndexSpec(str(index))
        self.keep_bytes = keep_bytes
        self._clock = clock
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="concord-milvus")
        self._known_models: set[str] = set()
        self._closed = False
        self._client = connect(uri, token, connect_timeout)
        self._search_params = milvus_index(self.spec)[1]
        try:
            ensure_collections(self._client, uri, collection, self.settings_collection, dim, self.spec)
            self._blobs = BlobStore(photos)
        except BaseException:
            self._client.close()
            release_lite(uri)
            raise
        self.orphans_removed = self._blobs.remove_orphans(self._kept_hashes, older_than=ORPHAN_AGE)

    # ----- opening ---------------------------------------------------------------------------------------------

    def _kept_hashes(self, shard: str) -> set[str]:
        rows = self._query(f'content_hash like "{shard}%" and has_bytes == true', ["content_hash"])
        return {str(r["content_hash"]) for r in rows}

    # ----- plumbing ----------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one Milvus call; a failure becomes MilvusUnavailable naming the server and the operation."""
        if self._closed:
            raise RuntimeError(f"the Milvus gallery {self.collection!r} at {self.uri} is closed")
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as err:
            raise MilvusUnavailable(f"Milvus at {self.uri} failed to {what} (collection {self.collection!r}): "
                                    f"{err}") from None

    def _query(self, expr: str, fields: list[str], collection: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("query", self._client.query, collection or self.collection, filter=expr,
                               output_fields=fields, consistency_level="Strong"))

    def _count(self, expr: str = "") -> int:
        rows = self._call("count", self._client.query, self.collection, filter=expr, output_fields=["count(*)"],
                          consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def _rows_by_hash(self, hashes: Collection[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        todo = sorted(hashes)
        for start in range(0, len(todo), BATCH):
            chunk = todo[start:start + BATCH]
            for row in self._query(f"content_hash in {json.dumps(chunk)}", FIELDS):
                found[str(row["content_hash"])] = row
        return found

    def entities(self, ids: list[int], with_vectors: bool = False) -> list[dict[str, Any]]:
        """The entities of these ids (every field; the vector too when asked), in no particular order."""
        fields = FIELDS + (["vector"] if with_vectors else [])
        return [row for start in range(0, len(ids), BATCH)
                for row in self._query(f"id in {[int(i) for i in ids[start:start + BATCH]]}", fields)]

    @property
    def blobs(self) -> BlobStore:
        """The folder of photo bytes."""
        return self._blobs

    @staticmethod
    def _record(row: Mapping[str, Any]) -> PhotoRecord:
        return PhotoRecord(int(row["id"]), str(row["content_hash"]), str(row["model_id"]), dict(row["metadata"]),
                           float(row["added_at"]), bool(row["has_bytes"]))

    # ----- writes ------------------------------------------------------------------------------------------

    def add(self, photos: Sequence[NewPhoto]) -> list[AddResult]:
        """Store photos, acknowledged by Milvus when this returns; a stored content hash is not stored again
        (`duplicate`, also for a repeat within `photos`). A bad photo raises ValueError and nothing is stored."""
        prepared = [prepare(i, photo, self.dim) for i, photo in enumerate(photos)]
        if not prepared:
            return []
        with self._write_lock:
            known = {h: AddResult(int(r["id"]), str(r["model_id"]), True)
                     for h, r in self._rows_by_hash({p.content_hash for p in prepared}).items()}
            fresh: dict[str, Prepared] = {}
            for p in prepared:
                if p.content_hash not in known:
                    fresh.setdefault(p.content_hash, p)
            if fresh:
                ids = self._allocate(list(fresh))
                self._write(list(fresh.values()), ids)
                known.update({h: AddResult(ids[h], p.model_id, False) for h, p in fresh.items()})
            return in_upload_order(prepared, known)

    def _allocate(self, hashes: list[str]) -> dict[str, int]:
        """An id per new hash: its first candidate no other photo holds (collisions of 52 bits are rare)."""
        candidates = {h: hash_ids(h) for h in hashes}
        every = sorted({i for ids in candidates.values() for i in ids})
        taken: dict[int, str] = {}
        for start in range(0, len(every), BATCH):
            for row in self._query(f"id in {every[start:start + BATCH]}", ["id", "content_hash"]):
                taken[int(row["id"])] = str(row["content_hash"])
        chosen: dict[str, int] = {}
        used: set[int] = set()
        for h, ids in candidates.items():
            free = [i for i in ids if taken.get(i, h) == h and i not in used]
            if not free:
                raise RuntimeError(f"no free id for sha256 {h}: all its candidate ids are taken")
            chosen[h] = free[0]
            used.add(free[0])
        return chosen

    def _write(self, fresh: list[Prepared], ids: dict[str, int]) -> None:
        """Bytes first, then the model registry, then the entities (one upsert)."""
        blobs = [(p.content_hash, p.data) for p in fresh if self.keep_bytes and p.data is not None]
        kept = {h for h, _ in blobs}
        self._blobs.write(blobs)
        self.register_models({p.model_id for p in fresh})
        now = float(self._clock())
        rows = [{"id": ids[p.content_hash], "vector": p.vector, "content_hash": p.content_hash,
                 "model_id": p.model_id, "metadata": json.loads(p.metadata_json), "added_at": now,
                 "has_bytes": p.content_hash in kept} for p in fresh]
        try:
            self.upsert_rows(rows)
        except BaseException:
            self._blobs.remove(kept)  # not referenced by any entity; harmless, but tidy up now
            raise

    def upsert_rows(self, rows: list[dict[str, Any]]) -> None:
        """Write entities as they are (ids, vectors and timestamps given): the add path and `concord migrate`."""
        for start in range(0, len(rows), BATCH):
            self._call("write photos", self._client.upsert, self.collection, rows[start:start + BATCH])

    def replace_vectors(self, model_id: str, replacements: Sequence[Replacement]) -> list[int]:
        """Swap photos' vectors for `model_id`'s by upserting their entities as read (id, hash, metadata, times and
        bytes kept); a photo deleted or no longer holding its `expected_model` is left alone. The ids swapped.
        The check and the upsert are one step within this process (its write lock); Milvus has no conditional
        upsert, so a delete by another process between the two can bring the photo back."""
        checked = {r.photo_id: r for r in check_replacements(replacements, model_id, self.dim)}
        if not checked:
            return []
        with self._write_lock:
            rows = [row for row in self.entities(list(checked))
                    if str(row["model_id"]) == checked[int(row["id"])].expected_model]
            if not rows:
                return []
            self.register_models({model_id})
            self.upsert_rows([{**{f: row[f] for f in FIELDS}, "vector": checked[int(row["id"])].vector,
                               "model_id": model_id} for row in rows])
            return sorted(int(row["id"]) for row in rows)

    def register_models(self, models: Collection[str]) -> None:
        """Record model ids that have vectors (what `counts` looks at)."""
        for model in sorted(set(models) - self._known_models):
            self.set_setting(MODEL_PREFIX + model, "1")
            self._known_models.add(model)

    def delete(self, photo_id: int) -> bool:
        """Remove a photo's entity, then its bytes; False when no photo has this id."""
        with self._write_lock:
            rows = self._query(f"id == {int(photo_id)}", FIELDS)
            if not rows:
                return False
            self._call("delete a photo", self._client.delete, self.collection, ids=[int(photo_id)])
            if rows[0]["has_bytes"]:
                self._blobs.remove([str(rows[0]["content_hash"])])
            return True

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting durably (e.g. the active indexing model)."""
        check_setting(key, value)
        self._call("write a setting", self._client.upsert, self.settings_collection,
                   [{"key": key, "value": value, "dummy": [0.0, 0.0]}])

    # ----- reads -------------------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        """A stored setting, or None."""
        rows = self._query(f"key == {json.dumps(key)}", ["value"], self.settings_collection)
        return str(rows[0]["value"]) if rows else None

    def get(self, photo_id: int) -> PhotoRecord | None:
        """The photo's record, or None."""
        rows = self._query(f"id == {int(photo_id)}", FIELDS)
        return self._record(rows[0]) if rows else None

    def find_by_hash(self, content_hash: str) -> PhotoRecord | None:
        """The record of the photo with this sha256, or None."""
        row = self._rows_by_hash([str(content_hash).lower()]).get(str(content_hash).lower())
        return None if row is None else self._record(row)

    def photo_bytes(self, photo_id: int) -> bytes | None:
        """The photo's bytes; None when there is no such photo or its bytes were not kept."""
        record = self.get(photo_id)
        if record is None or not record.has_bytes:
            return None
        data = self._blobs.read(record.content_hash)
        if data is None:
            log.error("gallery %s: the bytes of photo %s (sha256 %s) are missing from %s", self.collection, photo_id,
                      record.content_hash, self._blobs.folder)
        return data

    def vector(self, photo_id: int) -> np.ndarray | None:
        """The photo's stored vector (float32 [dim]), from Milvus."""
        rows = self._query(f"id == {int(photo_id)}", ["vector"])
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def models(self) -> list[str]:
        """Model ids that ever had vectors here (from the settings collection)."""
        rows = self._query(f'key like "{MODEL_PREFIX}%"', ["key"], self.settings_collection)
        return sorted(str(r["key"])[len(MODEL_PREFIX):] for r in rows)

    def counts(self) -> dict[str, int]:
        """Vectors per model id (models with none left out), counted by Milvus: the model registry and the counts
        of the models this process knows are read at once (one round trip), then any model new to it."""
        known = sorted(self._known_models)
        registry = self._pool.submit(self.models)
        counted = dict(zip(known, self._pool.map(self._model_count, known), strict=True))
        fresh = [m for m in registry.result() if m not in counted]
        counted.update(zip(fresh, self._pool.map(self._model_count, fresh), strict=True))
        self._known_models.update(fresh)
        return {m: n for m, n in sorted(counted.items()) if n > 0}

    def _model_count(self, model: str) -> int:
        return self._count(f"model_id == {json.dumps(model)}")

    def __len__(self) -> int:
        """Photos stored."""
        return self._count()

    def rows(self, fields: list[str] | None = None, batch: int = BATCH) -> Iterator[list[dict[str, Any]]]:
        """Every entity, `batch` at a time (for checks and exports)."""
        return self._pages("id >= 0", fields or ["id"], batch)

    def _pages(self, expr: str, fields: list[str], batch: int) -> Iterator[list[dict[str, Any]]]:
        """The entities matching `expr`, `batch` at a time, through Milvus's query iterator."""
        iterator = self._call("read photos", self._client.query_iterator, self.collection, batch_size=batch,
                              filter=expr, output_fields=fields, consistency_level="Strong")
        try:
            while page := self._call("read photos", iterator.next):
                yield list(page)
        finally:
            iterator.close()

    def stale_pages(self, model_id: str, page: int = 1024) -> Iterator[VectorPage]:
        """The photos whose vector another model than `model_id` made, about `page` at a time (Milvus's iterator:
        each page by id)."""
        fields = ["id", "model_id", "has_bytes", "vector"]
        for rows in self._pages(f"model_id != {json.dumps(model_id)}", fields, page):
            rows.sort(key=lambda r: int(r["id"]))
            vectors = np.array([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)
            yield VectorPage(np.array([int(r["id"]) for r in rows], dtype=np.int64),
                             [str(r["model_id"]) for r in rows], vectors,
                             np.array([bool(r["has_bytes"]) for r in rows], dtype=bool))

    def catalogue_ids(self) -> list[int]:
        """Every photo id in Milvus, sorted (the records and the vectors are one entity here)."""
        return sorted(int(r["id"]) for page in self.rows() for r in page)

    def index_ids(self) -> list[int]:
        """Every id a search can return, sorted: the same entities as `catalogue_ids`."""
        return self.catalogue_ids()

    # ----- search ------------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int = 10, offset: int = 0, models: Collection[str] | None = None,
               where: Mapping[str, Any] | None = None, added_after: float | None = None,
               added_before: float | None = None) -> list[Hit]:
        """The gallery photos nearest to a unit `query` vector, best first: ranks offset .. offset+k-1.

        Filters as the embedded store has them. Milvus filters by model, time and metadata (a superset where its
        JSON comparison is looser: True == 1 there); the exact check runs here, over-fetching until k+offset
        pass or Milvus has no more. Milvus ranks at most 16384 results (k + offset).
        """
        vector = check_vector(query, self.dim, "the query vector")
        check_paging(k, offset)
        wanted = wanted_models(models)
        where = check_where(where)
        low, high = check_times(added_after, added_before)
        need = k + offset
        if need > MAX_WINDOW:
            raise ValueError(f"k + offset is {need}; the Milvus gallery ranks at most {MAX_WINDOW} results: "
                             f"narrow the search with filters")
        if k == 0 or (wanted is not None and not wanted):
            return []
        expr = self._expression(wanted, where, low, high)
        limit = need if not where else min(MAX_WINDOW, max(4 * need, 64))
        while True:
            found = self._call("search", self._client.search, self.collection, data=[vector], limit=limit,
                               filter=expr, output_fields=FIELDS[1:], anns_field="vector",
                               search_params={"metric_type": "IP", "params": self._search_params},
                               consistency_level="Strong")[0]
            hits = [Hit(int(h["id"]), float(h["distance"]), str(h["entity"]["model_id"]),
                        dict(h["entity"]["metadata"]), float(h["entity"]["added_at"])) for h in found]
            passed = [h for h in hits if metadata_matches(h.metadata, where)]
            if len(passed) >= need or len(hits) < limit or limit >= MAX_WINDOW:
                break
            limit = min(MAX_WINDOW, limit * 4)
        passed.sort(key=lambda h: (-h.score, h.id))
        return passed[offset:need]

    @staticmethod
    def _expression(wanted: set[str] | None, where: Mapping[str, Any], low: float | None,
                    high: float | None) -> str:
        """The Milvus filter: models, the time range, and metadata equalities (None is checked here only)."""
        parts = []
        if wanted is not None:
            parts.append(f"model_id in {json.dumps(sorted(wanted))}")
        if low is not None:
            parts.append(f"added_at >= {low!r}")
        if high is not None:
            parts.append(f"added_at < {high!r}")
        for key, value in where.items():
            if value is not None:
                parts.append(f"metadata[{json.dumps(key)}] == {literal(value)}")
        return " and ".join(parts)

    # ----- closing -----------------------------------------------------------------------------------------

    def save_index(self) -> None:
        """Nothing to do: Milvus keeps and persists its own index."""

    def close(self) -> None:
        """Close the connection (every acknowledged write is in Milvus already); closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
            release_lite(self.uri)
        finally:
            self._pool.shutdown()
            self._blobs.close()

    def __enter__(self) -> MilvusGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


