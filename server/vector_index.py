"""The FAISS side of the gallery store: index kinds (flat, HNSW, IVF), deletes for each, and the snapshot file.

The index is a cache of the SQLite catalogue, so everything here may be thrown away and rebuilt; what it must
never do is claim to hold a catalogue state it does not (the snapshot records the sequence it holds and a
checksum, and anything unexpected in the file is a `SnapshotError` that makes the store rebuild).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from models.atomic import write_atomic

log = logging.getLogger("concord.store")

KIND_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 64},
    "ivf": {"nlist": 256, "nprobe": 16, "train_min": 0},
}
"""Each index kind's parameters and defaults (IVF's `train_min` 0 means 39 x nlist, FAISS's own minimum)."""
STRUCTURE = {"flat": (), "hnsw": ("M",), "ivf": ("nlist",)}
"""The parameters fixed inside a built index: a snapshot built with others is rebuilt; the rest apply at load."""
DEAD = -2
"""The id an HNSW entry gets when its photo's vector is replaced (FAISS cannot remove from HNSW): FAISS's id map
answers it for that entry, so a search drops it, and the snapshot keeps it."""
MAGIC = b"CONCORD-FAISS-1\n"
FORMAT = 1


def set_search_threads(count: int) -> None:
    """FAISS's OpenMP threads for this process (searches and index builds)."""
    if count < 1:
        raise ValueError(f"FAISS threads must be at least 1, got {count}")
    faiss.omp_set_num_threads(count)


class SnapshotError(Exception):
    """A snapshot that cannot be used (missing, truncated, corrupt, or made for another store/dim/kind)."""


class SnapshotMissing(SnapshotError):
    """No snapshot file: a new store, or one whose snapshot was deleted."""


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index the store keeps: "flat" (exact; the default), "hnsw" or "ivf" for large galleries.

    - flat: `IndexIDMap2(IndexFlatIP)`; exact inner product.
    - hnsw: `IndexIDMap2(IndexHNSWFlat)`, inner product; params M, ef_construction, ef_search. FAISS cannot
      remove from HNSW, so deletes are tombstones filtered at search time (and persisted in the snapshot);
      the store rebuilds the graph at open once tombstones pass a quarter of it.
    - ivf: `IndexIVFFlat`, inner product; params nlist, nprobe, train_min. Until the gallery holds
      `train_min` vectors (default 39 x nlist) it stays an exact flat index; then it is trained on them.

    One string also works, as a setting gives it: `IndexSpec("hnsw:M=16,ef_search=128")`.
    """

    kind: str = "flat"
    params: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise ValueError(f"index kind must be a string, got {type(self.kind).__name__}")
        kind, params = self.kind.strip(), dict(self.params)
        if ":" in kind:
            kind, text = kind.split(":", 1)
            params = {**_parse_params(text), **params}
        kind = kind.strip().lower()
        if kind not in KIND_PARAMS:
            raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KIND_PARAMS)}")
        known = KIND_PARAMS[kind]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"index {kind!r} has no parameter {', '.join(unknown)}; "
                             f"it takes {', '.join(known) or 'none'}")
        for name, value in params.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"index parameter {name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "params", params)
        if kind == "ivf" and self.get("train_min") < self.get("nlist"):
            raise ValueError(f"ivf train_min ({self.get('train_min')}) must be at least nlist ({self.get('nlist')})")

    def get(self, name: str) -> int:
        """A parameter's value, its default when not given."""
        if name == "train_min" and "train_min" not in self.params:
            return 39 * self.get("nlist")
        return int(self.params.get(name, KIND_PARAMS[self.kind][name]))

    def structure(self) -> dict[str, int]:
        return {name: self.get(name) for name in STRUCTURE[self.kind]}

    def __str__(self) -> str:
        text = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind}:{text}" if text else self.kind


def _parse_params(text: str) -> dict[str, int]:
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"index parameter {item!r} must read name=value (e.g. hnsw:ef_search=128)")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"index parameter {name.strip()} must be an integer, got {value.strip()!r}") from None
    return params


class Found(NamedTuple):
    """Nearest entries, best first (tombstones removed); `asked` entries were requested, FAISS gave `returned`."""

    scores: np.ndarray
    ids: np.ndarray
    asked: int
    returned: int


@dataclass(frozen=True)
class Snapshot:
    """A copy of an index taken under the store's lock, to be written outside it."""

    header: dict[str, Any]
    index_bytes: np.ndarray
    tombstones: np.ndarray

    def write(self, path: Path) -> None:
        """Write atomically (tmp, fsync, rename, fsync dir): a crash leaves the previous snapshot or this one."""
        body = [self.index_bytes.data, np.ascontiguousarray(self.tombstones, dtype="<i8").data]
        digest = hashlib.sha256()
        for part in body:
            digest.update(part)
        header = json.dumps({**self.header, "sha256": digest.hexdigest()}).encode()
        write_atomic(path, [MAGIC, struct.pack("<Q", len(header)), header, *body])


def entry_positions(view: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The entry of each of `ids` in the id map `view`, -1 where it holds none. A binary search first: a flat index
    keeps its ids ascending (the store adds in id order and never reuses one), so a backfill batch costs
    O(k log n), not a scan of the whole map per batch; any id it misses is looked for by a full scan."""
    where = np.full(len(ids), -1, dtype=np.int64)
    if not len(view) or not len(ids):
        return where
    guess = np.minimum(np.searchsorted(view, ids), len(view) - 1)
    hit = view[guess] == ids
    where[hit] = guess[hit]
    if not hit.all():
        rest = np.flatnonzero(~hit)
        found = np.flatnonzero(np.isin(view, ids[rest]))
        entry = {int(i): k for k, i in zip(found.tolist(), view[found].tolist(), strict=True)}
        where[rest] = [entry.get(int(i), -1) for i in ids[rest].tolist()]
    return where


class VectorIndex:
    """One FAISS index of (photo id, unit vector) under inner product, with deletes for every kind."""

    def __init__(self, spec: IndexSpec, dim: int, index: faiss.Index | None = None,
                 tombstones: Iterable[int] = ()) -> None:
        self.spec = spec
        self.dim = dim
        self._index: Any = index if index is not None else self._empty()
        self._tombstones = {int(t) for t in tombstones}
        view = self._id_map()
        self._dead = int(np.count_nonzero(view == DEAD)) if view is not None and self.spec.kind == "hnsw" else 0
        self._configure()

    def _empty(self) -> faiss.Index:
        if self.spec.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.spec.get("M"), faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.spec.get("ef_construction")
            return faiss.IndexIDMap2(inner)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))  # flat, and IVF until it is trained

    def _configure(self) -> None:
        """Apply the search-time parameters (they are not part of a snapshot's structure)."""
        if self.spec.kind == "hnsw":
            inner: Any = faiss.downcast_index(self._index.index)
            inner.hnsw.efSearch = self.spec.get("ef_search")
        ivf = self._ivf()
        if ivf is not None:
            ivf.nprobe = min(self.spec.get("nprobe"), ivf.nlist)

    def _id_map(self) -> np.ndarray | None:
        """A writable view of the id of every entry (None for a trained IVF index, which keeps ids in its lists)."""
        if not isinstance(self._index, faiss.IndexIDMap2):
            return None
        return faiss.rev_swig_ptr(self._index.id_map.data(), self._index.id_map.size())

    def _ivf(self) -> Any:
        return faiss.try_extract_index_ivf(self._index) if self.spec.kind == "ivf" else None

    @property
    def trained(self) -> bool:
        """False only for an IVF index that still waits for `train_min` vectors (searching exactly meanwhile)."""
        return self._ivf() is not None or self.spec.kind != "ivf"

    @property
    def ntotal(self) -> int:
        """Entries held, tombstones included."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal - len(self._tombstones) - self._dead

    @property
    def tombstone_share(self) -> float:
        """The share of entries a search skips: deleted photos and replaced vectors of HNSW."""
        return (len(self._tombstones) + self._dead) / self.ntotal if self.ntotal else 0.0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under their photo ids (ids the index does not hold: the store never reuses one)."""
        if not len(ids):
            return
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                 np.ascontiguousarray(ids, dtype=np.int64))
        if not self.trained and self.ntotal >= self.spec.get("train_min"):
            self._train()

    def remove(self, ids: np.ndarray) -> None:
        """Remove entries the index holds; HNSW cannot, so it marks them as tombstones instead."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.spec.kind == "hnsw":
            self._tombstones.update(ids.tolist())
        elif len(ids):
            self._index.remove_ids(ids)

    def replace(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Swap the vectors of photo ids the index holds (a backfill): a flat index overwrites them in place, HNSW
        marks the old entries DEAD and adds, a trained IVF index removes and adds."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(ids):
            return
        view = self._id_map()
        if self.spec.kind == "hnsw":
            assert view is not None
            old = np.flatnonzero(np.isin(view, ids))
            view[old] = DEAD
            self._dead += len(old)
        elif view is not None:  # flat, and IVF before training: FAISS's flat remove would move every vector
            missing = self._overwrite(view, ids, vectors)
            ids, vectors = ids[missing], vectors[missing]
        else:
            self.remove(ids)
        self.add(ids, vectors)

    def _overwrite(self, view: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Write the vectors of the ids a flat index holds over their entries; a mask of the ids it does not hold."""
        where = entry_positions(view, ids)
        held = where >= 0
        inner: Any = faiss.downcast_index(self._index.index)
        stored = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * self.dim).reshape(inner.ntotal, self.dim)
        stored[where[held]] = vectors[held]
        return ~held

    def search(self, query: np.ndarray, n: int) -> Found:
        """The `n` nearest entries to one unit query vector (fewer when the index holds fewer)."""
        asked = min(n, self.ntotal)
        if asked <= 0:
            return Found(np.zeros(0, np.float32), np.zeros(0, np.int64), 0, 0)
        scores, ids = self._index.search(query.reshape(1, -1).astype(np.float32, copy=False), asked)
        valid = ids[0] != -1  # FAISS's "no more entries"; a DEAD entry counts as returned, then is dropped
        scores, ids = scores[0][valid], ids[0][valid]
        returned = len(ids)
        if self._dead:
            scores, ids = scores[ids >= 0], ids[ids >= 0]
        if self._tombstones:
            keep = np.fromiter((int(i) not in self._tombstones for i in ids), dtype=bool, count=len(ids))
            scores, ids = scores[keep], ids[keep]
        return Found(scores, ids, asked, returned)

    def all_ids(self) -> np.ndarray:
        """Every photo id the FAISS structure holds, tombstones included, replaced HNSW entries not (unsorted)."""
        ivf = self._ivf()
        if ivf is None:
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            return ids[ids != DEAD] if self._dead else ids
        lists = ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def live_ids(self) -> np.ndarray:
        """The ids a search can return, sorted."""
        ids = self.all_ids()
        if self._tombstones:
            ids = ids[~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64))]
        return np.sort(ids)

    def _train(self) -> None:
        """Turn the exact staging index into a trained IVF index holding the same vectors."""
        staging = self._index
        count = staging.ntotal
        vectors = faiss.downcast_index(staging.index).reconstruct_n(0, count)
        ids = faiss.vector_to_array(staging.id_map).astype(np.int64)
        nlist = self.spec.get("nlist")
        sample = vectors
        if count > 256 * nlist:  # FAISS samples as much itself; a fixed seed keeps rebuilds reproducible
            sample = vectors[np.random.default_rng(0).choice(count, 256 * nlist, replace=False)]
        start = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.add_with_ids(vectors, ids)
        self._index = ivf
        self._configure()
        log.info("trained the IVF index (nlist=%d) on %d vectors in %.2fs", nlist, len(sample),
                 time.perf_counter() - start)

    def snapshot(self, seq: int, store_id: str) -> Snapshot:
        """Copy the index for writing; `seq` is the highest catalogue sequence it holds."""
        header = {"format": FORMAT, "store": store_id, "dim": self.dim, "kind": self.spec.kind,
                  "structure": self.spec.structure(), "trained": self.trained, "seq": seq,
                  "entries": self.ntotal, "written_at": time.time()}
        index_bytes = faiss.serialize_index(self._index)
        tombstones = np.array(sorted(self._tombstones), dtype=np.int64)
        header.update(index_bytes=int(index_bytes.nbytes), tombstones=len(tombstones))
        return Snapshot(header, index_bytes, tombstones)


def read_snapshot(path: Path, spec: IndexSpec, dim: int, store_id: str) -> tuple[VectorIndex, int]:
    """Load a snapshot and the catalogue sequence it holds; `SnapshotError` says why it cannot be used."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotMissing(f"no index snapshot at {path}") from None
    if not raw.startswith(MAGIC):
        raise SnapshotError(f"{path} is not a Concord index snapshot (bad magic bytes)")
    try:
        (length,) = struct.unpack_from("<Q", raw, len(MAGIC))
        start = len(MAGIC) + 8
        header = json.loads(raw[start:start + length])
        body = memoryview(raw)[start + length:]
        index_size, tomb_count, seq = int(header["index_bytes"]), int(header["tombstones"]), int(header["seq"])
        expected_digest = str(header["sha256"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{path}: unreadable header ({err})") from None
    if len(body) != index_size + 8 * tomb_count:
        raise SnapshotError(f"{path} is truncated or padded: {len(body)} bytes of body, header says "
                            f"{index_size + 8 * tomb_count}")
    if hashlib.sha256(body).hexdigest() != expected_digest:
        raise SnapshotError(f"{path} is corrupt (checksum mismatch)")
    wanted = {"format": FORMAT, "store": store_id, "dim": dim, "kind": spec.kind, "structure": spec.structure()}
    for key, value in wanted.items():
        if header.get(key) != value:
            raise SnapshotError(f"{path} was made for {key} {header.get(key)!r}, this store needs {value!r}")
    try:
        index = faiss.deserialize_index(np.frombuffer(body[:index_size], dtype=np.uint8))
    except RuntimeError as err:
        raise SnapshotError(f"{path}: FAISS cannot read the index ({str(err).splitlines()[0]})") from None
    _check_loaded(index, spec, dim, path)
    tombstones = np.frombuffer(body[index_size:], dtype="<i8")
    return VectorIndex(spec, dim, index, tombstones.tolist()), seq


def _check_loaded(index: faiss.Index, spec: IndexSpec, dim: int, path: Path) -> None:
    """The deserialised index must be of the kind, dim and metric the store builds."""
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise SnapshotError(f"{path} holds a {index.d}-dim index with metric {index.metric_type}; "
                            f"the store needs {dim}-dim inner product")
    if spec.kind == "ivf" and isinstance(index, faiss.IndexIVFFlat):
        if index.nlist != spec.get("nlist"):
            raise SnapshotError(f"{path} holds an IVF index with nlist {index.nlist}, not {spec.get('nlist')}")
        return
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    want = faiss.IndexHNSWFlat if spec.kind == "hnsw" else faiss.IndexFlat
    if not isinstance(inner, want):
        raise SnapshotError(f"{path} holds a {type(index).__name__} index, not the store's {spec.kind} index")
