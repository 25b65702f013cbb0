"""The gallery interface the service uses: every backend (embedded SQLite + FAISS, Milvus) stands behind it."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from server.store.records import AddResult, Hit, NewPhoto, PhotoRecord, Replacement, VectorPage


class Gallery(Protocol):
    """Photos, one vector each with the model that made it, their metadata and bytes, and durable settings."""

    dim: int
    remote: bool
    """True when every call is a network round trip (Milvus): the service then overlaps the ones it can."""

    def add(self, photos: Sequence[NewPhoto]) -> list[AddResult]:
        """Store photos, durable when this returns; a stored content hash is not stored again (`duplicate`)."""
        ...

    def delete(self, photo_id: int) -> bool:
        """Remove a photo's record, vector and bytes; False when there is no such photo."""
        ...

    def replace_vectors(self, model_id: str, replacements: Sequence[Replacement]) -> list[int]:
        """Swap photos' vectors for `model_id`'s in place (id, hash, metadata, times and bytes kept), durable when
        this returns; a photo deleted or no longer holding its `expected_model` is left alone. The ids swapped."""
        ...

    def stale_pages(self, model_id: str, page: int = 1024) -> Iterator[VectorPage]:
        """The photos whose vector another model than `model_id` made, `page` at a time by id (what a backfill
        to `model_id` re-encodes); no lock is held between pages."""
        ...

    def get(self, photo_id: int) -> PhotoRecord | None:
        """The photo's record, or None."""
        ...

    def find_by_hash(self, content_hash: str) -> PhotoRecord | None:
        """The record of the photo with this sha256, or None."""
        ...

    def photo_bytes(self, photo_id: int) -> bytes | None:
        """The photo's bytes; None when there is no such photo or its bytes were not kept."""
        ...

    def vector(self, photo_id: int) -> np.ndarray | None:
        """The photo's stored vector (float32 [dim]), or None."""
        ...

    def search(self, query: np.ndarray, k: int = 10, offset: int = 0, models: Collection[str] | None = None,
               where: Mapping[str, Any] | None = None, added_after: float | None = None,
               added_before: float | None = None) -> list[Hit]:
        """The photos nearest to a unit `query`, best first: ranks offset .. offset+k-1 after the filters."""
        ...

    def counts(self) -> dict[str, int]:
        """Vectors per model id (models with none left out)."""
        ...

    def __len__(self) -> int:
        """Photos stored."""
        ...

    def get_setting(self, key: str) -> str | None:
        """A stored setting, or None."""
        ...

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting durably."""
        ...

    def catalogue_ids(self) -> list[int]:
        """Every photo id of the source of truth, sorted (diagnostics)."""
        ...

    def index_ids(self) -> list[int]:
        """Every id a search can return, sorted (diagnostics)."""
        ...

    def save_index(self) -> None:
        """Write the backend's index cache durably now (a no-op where the engine keeps its own index)."""
        ...

    def close(self) -> None:
        """Make everything durable and release the backend; closing twice is harmless."""
        ...
