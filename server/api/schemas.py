"""The request and answer bodies of the API, and the conversions from the service's records to them."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from models.match import Match
from server.contract import MAX_K, MAX_OFFSET, SearchAnswer, SearchQuery

INT64 = 2**63
MAX_JSON_DEPTH = 8
"""Deepest nesting of objects and arrays accepted in `metadata` and `filter` JSON."""
MAX_FILTER_KEYS = 32
Int64 = Annotated[int, Field(strict=True, ge=-INT64, le=INT64 - 1)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _plain_value(value: Any) -> Any:
    """Refuse, in one clear message, the numbers no stored metadata can hold: beyond int64, NaN, infinite."""
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ValueError("an integer beyond the 64-bit range (+-2^63) matches no stored metadata")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a filter value must be a finite number, not NaN or infinite")
    return value


Scalar = Annotated[StrictBool | Int64 | FiniteFloat | Annotated[str, Field(max_length=1024)] | None,
                   BeforeValidator(_plain_value)]
"""A metadata value a filter can compare with: a bool, an int64, a finite float, a string or null."""
Filter = Annotated[dict[Annotated[str, Field(max_length=256)], Scalar], Field(max_length=MAX_FILTER_KEYS)]


class ErrorItem(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description="Where the field is, e.g. ['body', 'k'].")
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error answer: what was wrong in one line; 422s for invalid fields list them in `errors`, 409s of
    the gate carry its verdict."""

    model_config = ConfigDict(extra="allow")
    detail: str = Field(description="What was wrong, and what to do about it.")
    errors: list[ErrorItem] | None = Field(None, description="Invalid fields (422 for a missing or invalid field).")


ERROR_TEXT = {
    400: "The body is not what the content type says (unparseable JSON or form).",
    401: "No API key (writes, or reads with CONCORD_AUTH_READS=true).",
    403: "A wrong API key.",
    404: "No photo with this id (or no model of this id to upgrade to).",
    409: "The query model cannot search this gallery (not in the release, another space, not joined by lineage), "
         "the compatibility gate refuses the upgrade, or a backfill runs already (an upgrade waits for it too).",
    413: "The body is over CONCORD_MAX_REQUEST_BYTES, the photos over CONCORD_MAX_REQUEST_PIXELS or one photo's "
         "metadata over CONCORD_MAX_METADATA_BYTES.",
    415: "A file that is no photo by its bytes.",
    422: "A missing or invalid field, a photo that cannot be decoded (truncated, decompression bomb), a bad "
         "embedding, or JSON the server refuses (NaN, numbers beyond int64 or float, nested too deeply).",
    503: "The server is starting or stopping.",
}
COMMON_ERRORS = (400, 401, 403, 413, 422, 503)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the common error codes and `codes`, each answering ErrorOut."""
    return {code: {"model": ErrorOut, "description": ERROR_TEXT[code]}
            for code in sorted({*COMMON_ERRORS, *codes})}


def validation_message(items: Any) -> str:
    """One line from pydantic's error list: 'body.k: Input should be ...; ...'."""
    parts = [f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}".lstrip(": ")
             for item in list(items)[:5]]
    more = len(list(items)) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
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
    filter: Filter | None = Field(None, description="Metadata equality: every key must equal its value.")
    added_after: datetime | None = Field(None, description="Only photos added after this time (ISO 8601 or unix).")
    added_before: datetime | None = None
    match: Match = Field("similar", description=MATCH_HELP)


class EmbeddingQuery(Filters):
    """An embedding made on a device (or anywhere) by `model_id`."""

    vector: list[float] = Field(max_length=8192, description="The L2-normalised embedding.")
    model_id: str = Field(max_length=256, description="The model that made the vector, e.g. edge-v2.")


class LookupRequest(BaseModel):
    hashes: list[str] = Field(max_length=10_000, description="sha256 hex digests of photo files.")


class LookupResponse(BaseModel):
    found: dict[str, int] = Field(description="sha256 -> photo id of every hash already stored.")
    missing: list[str]


class UpgradeRequest(BaseModel):
    model_id: str = Field(description="The newer cloud model that should index new photos, e.g. cloud-v2.")


class BackfillRequest(BaseModel):
    share: float = Field(1.0, gt=0, le=1, strict=True, allow_inf_nan=False,
                         description="The part of the photos needing a backfill to re-encode, in the backfill's "
                                     "order (highest scores first): 0.25 re-encodes the quarter that pays most.")


class BackfillStatus(BaseModel):
    """The backfill job (the last one, once it ended): re-encoding stored photos with the active cloud model."""

    state: Literal["idle", "running", "done", "failed", "interrupted"] = Field(
        description="idle: none ever ran; interrupted: stopped by a shutdown (the next start resumes it) or by "
                    "another server changing the active model.")
    target_model: str | None = Field(None, description="The cloud model re-encoding the photos.")
    share: float | None = None
    planned: int | None = Field(None, description="Photos that needed a backfill (with kept bytes) when it began.")
    total: int | None = Field(None, description="Photos this job re-encodes: share x planned (None while planning).")
    done: int = 0
    skipped_no_bytes: int = Field(0, description="Photos left as they are: their bytes were not kept.")
    skipped_gone: int = Field(0, description="Photos deleted (or re-encoded by another server) while it ran.")
    failed: int = Field(0, description="Photos whose kept bytes could not be decoded.")
    failed_ids: list[int] = Field(default_factory=list, description="The first 100 of them.")
    order: Literal["scorer", "by id"] | None = Field(
        None, description="scorer: the release's backfill scorers ranked the photos; by id: oldest model first.")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rate: float | None = Field(None, description="Photos per second since this server (re)started the job.")
    eta_s: float | None = Field(None, description="Seconds left at that rate.")
    resumed: int = Field(0, description="Times a restarted server resumed the job.")
    message: str = ""


def backfill_out(status: dict[str, Any]) -> BackfillStatus:
    """The answer body of a backfill status (times as datetimes)."""
    times = {k: None if status.get(k) is None else to_datetime(status[k]) for k in ("started_at", "finished_at")}
    return BackfillStatus.model_validate({**status, **times})


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
                          hits=[HitOut(id=h.id, score=cosine(h.score), model_id=h.model_id, metadata=h.metadata,
                                       added_at=to_datetime(h.added_at)) for h in answer.hits])


def cosine(score: float) -> float:
    """An inner product of unit vectors as the cosine it is: float32 rounding puts a photo's score against its own
    vector at 1.0000005, and a user reads a score above 1 as a bug."""
    return min(1.0, max(-1.0, score))


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
