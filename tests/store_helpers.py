"""Photos, vectors and reference rankings shared by the gallery store tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from server.store import GalleryStore, Hit, NewPhoto

DIM = 16
ROOT = Path(__file__).resolve().parent.parent
KINDS = ["flat", "hnsw:M=8,ef_search=64", "ivf:nlist=4,nprobe=4,train_min=40"]


def vector_for(content_hash: str) -> np.ndarray:
    """A unit vector fixed by a content hash (the crash writer and the checks compute the same one)."""
    rng = np.random.default_rng(int(content_hash[:16], 16))
    v = rng.standard_normal(16)
    return (v / np.linalg.norm(v)).astype(np.float32)


def photo(name: str, model: str = "cloud-v1", metadata: dict[str, Any] | None = None,
          data: bool = True) -> NewPhoto:
    raw = name.encode()
    h = hashlib.sha256(raw).hexdigest()
    return NewPhoto(h, vector_for(h), model, metadata if metadata is not None else {"name": name},
                    raw if data else None)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def exact(store: GalleryStore, ids: list[int], query: np.ndarray, k: int) -> list[int]:
    """Brute-force ranking over the stored vectors of `ids` (ties by id), the reference for search."""
    matrix = np.stack([vector_for(store.get(i).content_hash) for i in ids])  # type: ignore[union-attr]
    scores = dict(zip(ids, (matrix @ query).tolist(), strict=True))
    return sorted(ids, key=lambda i: (-scores[i], i))[:k]


def hit_ids(hits: list[Hit]) -> list[int]:
    return [h.id for h in hits]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def fill(store: GalleryStore, n: int, start: int = 0) -> list[int]:
    """Add n photos (vectors and metadata; no bytes: writing those is tested apart, and fsyncs are slow)."""
    photos = [photo(f"p{i}", "cloud-v1" if i % 3 else "cloud-v2",
                    {"album": "odd" if i % 2 else "even", "n": i, "fav": i % 5 == 0}, data=False)
              for i in range(start, start + n)]
    return [r.id for r in store.add(photos)]
