"""`concord migrate`: move an embedded store into a Milvus gallery as it is, then prove nothing was lost.

The rows move with their ids, vectors (float32, bit for bit), model ids, metadata, timestamps and settings;
photo bytes are hard-linked (or copied) into the Milvus-mode photos folder. Nothing is encoded again. The store's
folder lock is held throughout, so no server writes to it meanwhile; the embedded store itself is not changed.
Running it again after an interruption finishes the job (writes are upserts by id).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.store.backends import GalleryLocation
from server.store.blobs import BlobStore
from server.store.catalogue import CHUNK, Catalogue, lock_folder, recorded_dim
from server.store.milvus import MilvusGallery
from server.vector_index import IndexSpec

ROWS = "SELECT id, content_hash, model_id, metadata, vector, added_at, has_bytes FROM photos WHERE id > ? " \
       "ORDER BY id LIMIT ?"


@dataclass
class MigrationReport:
    """What moved and what the read-back found."""

    target: str
    photos: int = 0
    vectors: dict[str, int] = field(default_factory=dict)
    settings: int = 0
    bytes_files: int = 0
    verified: int = 0
    lost: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        models = ", ".join(f"{m} {n}" for m, n in sorted(self.vectors.items())) or "none"
        verdict = "0 lost" if not self.lost else f"{len(self.lost)} LOST OR DIFFERENT (ids {self.lost[:10]})"
        return (f"migrated {self.photos} photos into {self.target} in {self.seconds:.1f} s (vectors: {models}; "
                f"{self.settings} settings; {self.bytes_files} photo files); read back and compared "
                f"{self.verified}: {verdict}; nothing re-encoded")


def _chunks(conn: Any, dim: int) -> Iterator[list[dict[str, Any]]]:
    last = 0
    while rows := conn.execute(ROWS, (last, CHUNK)).fetchall():
        last = int(rows[-1][0])
        yield [{"id": int(r[0]), "content_hash": str(r[1]), "model_id": str(r[2]), "metadata": json.loads(r[3]),
                "vector": np.frombuffer(r[4], dtype="<f4").astype(np.float32).reshape(dim),
                "added_at": float(r[5]), "has_bytes": bool(r[6])} for r in rows]


def _move_bytes(source: BlobStore, target: BlobStore, hashes: list[str]) -> int:
    """Hard-link (same file system) or copy atomically each photo file the target lacks."""
    moved = 0
    copies: list[tuple[str, bytes]] = []
    for content_hash in hashes:
        src, dst = source.path(content_hash), target.path(content_hash)
        if dst.exists():
            continue
        dst.parent.mkdir(exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            data = source.read(content_hash)
            if data is None:
                raise RuntimeError(f"the bytes of sha256 {content_hash} are missing from {source.folder}") from None
            copies.append((content_hash, data))
        moved += 1
    target.write(copies)
    return moved


def _compare(expected: list[dict[str, Any]], milvus: MilvusGallery) -> list[int]:
    """Ids whose Milvus entity is missing or differs in any field (vectors compared bit for bit)."""
    got = {int(r["id"]): r for r in milvus.entities([row["id"] for row in expected], with_vectors=True)}
    bad = []
    for row in expected:
        have = got.get(row["id"])
        if have is None or any(have[k] != row[k] for k in ("content_hash", "model_id", "metadata", "added_at",
                                                            "has_bytes")) \
                or not np.array_equal(np.asarray(have["vector"], dtype=np.float32), row["vector"]):
            bad.append(row["id"])
    return bad


def migrate(data_dir: Path, gallery: str, to_data_dir: Path, index: str = "flat") -> MigrationReport:
    """Copy the embedded store in `data_dir/gallery` into the Milvus `gallery`, bytes into `to_data_dir/photos`."""
    start = time.perf_counter()
    location = GalleryLocation.parse(gallery)
    if location.kind == "embedded":
        raise ValueError("migrate moves the embedded store INTO Milvus: give --gallery milvus://host:19530 or "
                         "milvus-lite:./gallery.db")
    folder = Path(data_dir) / "gallery"
    dim = recorded_dim(folder)
    if dim is None:
        raise ValueError(f"no embedded store in {folder} (no catalog.sqlite with a schema)")
    if location.kind == "milvus-lite":
        Path(location.uri).parent.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder)
    catalogue = Catalogue(folder / "catalog.sqlite")
    source_blobs = BlobStore(folder / "photos")
    report = MigrationReport(str(location))
    try:
        with catalogue.pooled() as conn, MilvusGallery(location.uri, location.collection, dim,
                                                       Path(to_data_dir) / "photos", IndexSpec(index)) as milvus:
            settings = conn.execute("SELECT key, value FROM settings").fetchall()
            models = Catalogue.counts(conn)
            milvus.register_models(models)
            for rows in _chunks(conn, dim):
                report.bytes_files += _move_bytes(source_blobs, milvus.blobs,
                                                  [r["content_hash"] for r in rows if r["has_bytes"]])
                milvus.upsert_rows(rows)
                report.photos += len(rows)
            for key, value in settings:
                milvus.set_setting(str(key), str(value))
            report.settings = len(settings)
            for rows in _chunks(conn, dim):
                report.lost += _compare(rows, milvus)
                report.verified += len(rows)
            report.vectors = milvus.counts()
            if report.vectors != {m: n for m, n in models.items() if n}:
                raise RuntimeError(f"Milvus counts {report.vectors} vectors per model, the store {models}: the "
                                   f"collection held other photos before; migrate into an empty collection")
    finally:
        source_blobs.close()
        catalogue.close()
        os.close(lock)
    report.seconds = time.perf_counter() - start
    return report
