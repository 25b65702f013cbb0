"""The request and answer bodies of the API, and the conversions from the service's records to them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from models.match import Match
from server.service import MAX_K, MAX_OFFSET, SearchAnswer, SearchQuery

Scalar = str | int | float | bool | None
class PhotoAdded(BaseModel):
    """What happened to one uploaded photo."""

    id: int
    model_id: str = Field(description="The model whose vector the gallery holds for this photo.")
    duplicate: bool = Field(description="The same bytes (sha256) were stored already; nothing new was stored.")
    filename: str
    content_hash: str


class AddResponse(BaseModel):
    photos: list[PhotoAdded]
    added: int
    duplicates: int


class PhotoOut(BaseModel):
    id: int
    content_hash: str
    model_id: str
    metadata: dict[str, Any]
    added_at: datetime
    has_bytes: bool


class PhotoList(BaseModel):
    photos: list[PhotoOut]


class HitOut(BaseModel):
    id: int
    score: float = Field(description="Inner product of the query and the gallery vector (cosine).")
    model_id: str = Field(description="The model that made the gallery vector.")
    metadata: dict[str, Any]
    added_at: datetime


MATCH_HELP = ("similar (default): photos that show the same kind of thing; duplicate: the same photo (cropped, "
              "resized, re-saved), which needs a release whose space has a photo fingerprint.")


class SearchResponse(BaseModel):
    query_model: str
    match: Match = Field(description="How the query matched: similar or duplicate.")
    k: int
    offset: int
    searched_models: list[str] = Field(description="Gallery models whose vectors this query model may search.")
    skipped_models: dict[str, str] = Field(description="Gallery models it may not search, with why.")
    hits: list[HitOut]


class Filters(BaseModel):
    """Metadata equality filters and a date-added range, shared by every search."""

    k: int = Field(10, ge=1, le=MAX_K)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    filter: dict[str, Scalar] | None = Field(None, description="Metadata equality: every key must equal its value.")
    added_after: datetime | None = Field(None, description="Only photos added after this time (ISO 8601 or unix).")
    added_before: datetime | None = None
    match: Match = Field("similar", description=MATCH_HELP)


class EmbeddingQuery(Filters):
    """An embedding made on a device (or anywhere) by `model_id`."""

    vector: list[float] = Field(description="The L2-normalised embedding.")
    model_id: str = Field(description="The model that made the vector, e.g. edge-v2.")


class LookupRequest(BaseModel):
    hashes: list[str] = Field(max_length=10_000, description="sha256 hex digests of photo files.")


class LookupResponse(BaseModel):
    found: dict[str, int] = Field(description="sha256 -> photo id of every hash already stored.")
    missing: list[str]


class UpgradeRequest(BaseModel):
    model_id: str = Field(description="The newer cloud model that should index new photos, e.g. cloud-v2.")


def to_time(value: float | datetime | None) -> float | None:
    """A time as unix seconds (a naive datetime is UTC)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return value


def search_query(f: Filters) -> SearchQuery:
    """The service's query of a JSON search body."""
    return SearchQuery(f.k, f.offset, f.filter, to_time(f.added_after), to_time(f.added_before), f.match)


def search_response(answer: SearchAnswer, query: SearchQuery) -> SearchResponse:
    """The answer body of a search."""
    return SearchResponse(query_model=answer.query_model, match=query.match, k=query.k, offset=query.offset,
                          searched_models=answer.searched, skipped_models=answer.skipped,
                          hits=[HitOut(id=h.id, score=h.score, model_id=h.model_id, metadata=h.metadata,
                                       added_at=to_datetime(h.added_at)) for h in answer.hits])


def to_datetime(value: Any) -> datetime:
    """A stored time (unix seconds or ISO text) as a datetime."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


def photo_out(record: Any) -> PhotoOut:
    """The answer body of a photo record."""
    return PhotoOut(id=record.id, content_hash=record.content_hash, model_id=record.model_id,
                    metadata=record.metadata, added_at=to_datetime(record.added_at), has_bytes=record.has_bytes)
