"""What the service takes and answers, the errors it raises and the checks of what it takes: each error carries
its HTTP status and a message that says what was wrong (routes and schemas use these; the service fills them)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from models.manifest import ModelEntry
from models.match import Match
from models.preprocess import MAX_PIXELS, ImageError, load_image
from server.security import ACCEPTED, sniff_image
from server.store import Hit
from server.store import check_vector as store_check_vector

MAX_K = 100
"""Most hits in one answer: with metadata capped per photo (`Limits.max_metadata_bytes`) an answer stays under
about k x (cap + 300 bytes), 0.5 MB at the defaults (k=1000 once answered 18 MB)."""
MAX_OFFSET = 100_000


@dataclass(frozen=True)
class Limits:
    """What one request may cost: decoded pixels (CPU), metadata bytes per photo, concurrent decodes (memory)."""

    max_request_pixels: int = 512_000_000
    """Pixels of all new photos of one upload, by their headers (16 photos of 32 MP); more gets 413."""
    max_photo_pixels: int = MAX_PIXELS
    """Pixels of one photo (the decompression-bomb guard); more gets 422."""
    max_metadata_bytes: int = 4096
    """JSON size of one photo's metadata; larger gets 413 (a request stores at most files x this)."""
    decode_slots: int = 2
    """Photos decoded at once in the whole process: each may take ~170 MB at the pixel guard, so the decoded
    pixels of all requests together stay under decode_slots x 170 MB."""


class ServiceError(Exception):
    """A request the service refuses; `status` is its HTTP code, `extra` goes into the JSON answer."""

    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The request cannot be served by this release or gallery (unknown or incompatible model, failed gate)."""

    status = 409


class UnsupportedMedia(ServiceError):
    status = 415


class TooLarge(ServiceError):
    """A request within the body limit whose photos or metadata are over another limit."""

    status = 413


class Unprocessable(ServiceError):
    status = 422


@dataclass(frozen=True)
class Upload:
    """One uploaded photo: the name the client gave, its bytes and its metadata."""

    filename: str
    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Added:
    """What became of one uploaded photo: its id, the model of its vector, whether it was stored already."""

    id: int
    model_id: str
    duplicate: bool
    content_hash: str


@dataclass(frozen=True)
class SearchQuery:
    """Paging and filters of a search: metadata equality (`where`), a date-added range (unix seconds), and how the
    query matches (`similar`: what the photo shows; `duplicate`: the same photo, see `models.match`)."""

    k: int = 10
    offset: int = 0
    where: dict[str, Any] | None = None
    added_after: float | None = None
    added_before: float | None = None
    match: Match = "similar"


@dataclass(frozen=True)
class SearchAnswer:
    """Hits, best first, and which gallery models the query model searched or had to skip (with why)."""

    query_model: str
    searched: list[str]
    skipped: dict[str, str]
    hits: list[Hit]


def check_format(data: bytes, name: str) -> None:
    """422 for an empty file, 415 for bytes of no accepted image format (judged by content, not the claimed type)."""
    if not data:
        raise Unprocessable(f"{name}: the file is empty")
    if sniff_image(data) is None:
        raise UnsupportedMedia(f"{name}: not a photo; its bytes are no {ACCEPTED} (judged by content, not by the "
                               f"claimed type)")


def photo_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """A photo's pixel count by its header, decoding nothing: 415 no image format, 422 unreadable or a bomb."""
    check_format(data, name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise Unprocessable(f"{name}: refused as a decompression bomb ({err})") from None
    except (OSError, ValueError) as err:
        raise Unprocessable(f"{name}: the photo is corrupt or truncated ({err})") from None
    if width * height > max_pixels:
        raise Unprocessable(f"{name}: {width}x{height} is {width * height:,} pixels, above the limit of "
                            f"{max_pixels:,} (decompression-bomb guard)")
    return width * height


def decode_photo(data: bytes, name: str) -> Image.Image:
    """Check a photo by its bytes (415 when it is no image format) and decode it (422 when it cannot be)."""
    check_format(data, name)
    try:
        return load_image(data)
    except ImageError as err:
        message = str(err).removeprefix("photo: ")
        raise Unprocessable(f"{name}: {message}") from None


def check_vector(values: list[float] | np.ndarray, entry: ModelEntry) -> np.ndarray:
    """A query embedding as float32 [dim], refused (422) unless it has the model's dim, is finite and unit norm."""
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise Unprocessable("the vector must be a list of numbers") from None
    if vector.ndim != 1 or vector.shape[0] != entry.dim:
        size = vector.shape[0] if vector.ndim == 1 else f"shape {list(vector.shape)}"
        raise Unprocessable(f"the vector has {size} values; model {entry.id!r} embeds into {entry.dim} dimensions")
    try:
        return store_check_vector(vector, entry.dim, "the vector")  # finite, unit norm within NORM_TOLERANCE
    except ValueError as err:
        raise Unprocessable(str(err)) from None
