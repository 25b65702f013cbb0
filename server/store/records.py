"""What a gallery stores and answers, for every backend: the record dataclasses and the checks of what goes in."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-3
"""A stored or query vector must have L2 norm 1 within this much."""
HASH = re.compile(r"[0-9a-f]{64}")
"""A content hash: a sha256 hex digest, lower case."""


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
class Replacement:
    """A photo's new vector, written only while the photo still holds `expected_model`'s (a backfill's swap)."""

    photo_id: int
    vector: np.ndarray
    expected_model: str


@dataclass(frozen=True)
class VectorPage:
    """Stored vectors of some photos, by id: ids int64 [n], the model of each, float32 [n, dim], bytes kept [n]."""

    ids: np.ndarray
    models: list[str]
    vectors: np.ndarray
    has_bytes: np.ndarray


@dataclass(frozen=True)
class Recovery:
    """What opening the store found and did. `index`: "loaded" (snapshot current), "replayed" or "rebuilt"."""

    index: str
    replayed: int
    reason: str | None
    tmp_removed: int
    orphans_removed: int


@dataclass(frozen=True)
class Prepared:
    """A checked photo, ready to write: lower-case hash, float32 vector, metadata as JSON text, bytes or None."""

    content_hash: str
    vector: np.ndarray
    model_id: str
    metadata_json: str
    data: bytes | None


def prepare(position: int, photo: NewPhoto, dim: int) -> Prepared:
    """Check one photo completely (no I/O): hash, vector, model id, metadata, bytes matching the hash."""
    name = f"photo #{position}"
    if not isinstance(photo, NewPhoto):
        raise ValueError(f"{name}: expected a NewPhoto, got {type(photo).__name__}")
    content_hash = photo.content_hash.lower() if isinstance(photo.content_hash, str) else ""
    if not HASH.fullmatch(content_hash):
        raise ValueError(f"{name}: content_hash must be a sha256 hex digest (64 hex digits), "
                         f"got {str(photo.content_hash)[:80]!r}")
    name = f"photo #{position} (sha256 {content_hash[:12]}…)"
    vector = check_vector(photo.vector, dim, f"{name}: the vector")
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
    return Prepared(content_hash, vector, photo.model_id, metadata_json(photo.metadata, name), data)


def check_replacements(replacements: Sequence[Replacement], model_id: str, dim: int) -> list[Replacement]:
    """Replacements with checked vectors (float32 unit [dim]), or ValueError naming the first bad one."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    checked = []
    for r in replacements:
        if isinstance(r.photo_id, bool) or not isinstance(r.photo_id, int | np.integer):
            raise ValueError(f"a replacement's photo id must be an integer, got {r.photo_id!r}")
        vector = check_vector(r.vector, dim, f"the new vector of photo {r.photo_id}")
        checked.append(Replacement(int(r.photo_id), vector, str(r.expected_model)))
    return checked


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


def metadata_json(metadata: Any, name: str) -> str:
    """Metadata as JSON text, or ValueError unless it is a JSON object with string keys."""
    if not isinstance(metadata, Mapping) or not all(isinstance(key, str) for key in metadata):
        raise ValueError(f"{name}: metadata must be a JSON object (a dict with string keys)")
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: metadata is not JSON-serialisable ({err})") from None


def check_setting(key: Any, value: Any) -> None:
    """ValueError unless a setting has a non-empty string key and a string value."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a setting key must be a non-empty string, got {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"setting {key!r}: the value must be a string, got {type(value).__name__}")


def check_paging(k: Any, offset: Any) -> None:
    """ValueError unless `k` and `offset` are non-negative integers."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}")


def wanted_models(models: Collection[str] | str | None) -> set[str] | None:
    """The model ids a search keeps (None: every model)."""
    return None if models is None else {models} if isinstance(models, str) else set(models)


def check_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata equality filters, checked: string keys; str, finite number, bool or None values."""
    if where is not None and not isinstance(where, Mapping):
        raise ValueError(f"where must map metadata fields to values, got {type(where).__name__}")
    for key, value in (where or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"a where filter names a metadata field by string, got {key!r}")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError(f"where filter {key!r}: {value} is not a finite number")
            continue
        raise ValueError(f"where filter {key!r}: compare with a string, number, boolean or null, "
                         f"not {type(value).__name__}")
    return dict(where or {})


def check_times(after: Any, before: Any) -> tuple[float | None, float | None]:
    """The date-added range as floats (None: open), or ValueError unless each bound is finite unix seconds."""
    bounds: list[float | None] = []
    for name, value in (("added_after", after), ("added_before", before)):
        if value is None:
            bounds.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of unix seconds, got {value!r}")
        bounds.append(float(value))
    return bounds[0], bounds[1]


def metadata_matches(metadata: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """True when `metadata` passes the equality filters as JSON types them (True is not 1, "1" is not 1; None
    also matches a missing field)."""
    for key, value in where.items():
        have = metadata.get(key)
        if value is None:
            if have is not None:
                return False
        elif isinstance(value, bool) or isinstance(have, bool):
            if not (isinstance(value, bool) and isinstance(have, bool) and have == value):
                return False
        elif isinstance(value, int | float):
            if not isinstance(have, int | float) or float(have) != float(value):
                return False
        elif not isinstance(have, str) or have != value:
            return False
    return True


def in_upload_order(prepared: Sequence[Prepared], known: Mapping[str, AddResult]) -> list[AddResult]:
    """The answer of an add, one result per photo in the order given: a photo that came twice in one batch is a
    duplicate the second time (both backends answer so)."""
    results, first = [], set()
    for p in prepared:
        result = known[p.content_hash]
        if p.content_hash in first and not result.duplicate:
            result = AddResult(result.id, result.model_id, True)
        first.add(p.content_hash)
        results.append(result)
    return results
