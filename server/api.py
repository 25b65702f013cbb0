"""The HTTP API, versioned under /v1: thin routes that check input and call the `Service` off the event loop.

Status codes: 401 no API key, 403 a wrong one; 404 an unknown photo (and an unknown model to upgrade to);
409 a query model this gallery cannot be searched with (unknown to the release, another space, or not joined
by lineage) and an upgrade the compatibility gate refuses; 413 a request too large; 415 a file that is no
image by its bytes; 422 a photo that cannot be decoded (truncated, decompression bomb), an embedding of
the wrong dim, not finite or not unit norm, an unknown `match`, and `match=duplicate` in a space without
a photo fingerprint.

Every search takes `match`: `similar` (default; what the photo shows) or `duplicate` (the same photo, cropped,
resized or re-saved: the query's pixel fingerprint counts as much as its semantic part; see `models.match`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from models.match import Match
from server.security import check_key
from server.service import (
    MAX_K,
    MAX_OFFSET,
    SearchAnswer,
    SearchQuery,
    Service,
    ServiceError,
    Unprocessable,
    Upload,
)
from server.settings import Settings

Scalar = str | int | float | bool | None
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token (alternative to X-API-Key).")


class NotReady(ServiceError):
    status = 503


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the server is starting or stopping; retry in a moment")
    return service


def _key(header: str | None, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return header or (credentials.credentials if credentials else None)


def require_write_key(settings: Annotated[Settings, Depends(get_settings)],
                      header: Annotated[str | None, Depends(api_key_header)],
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Writes need the API key whenever one is configured."""
    check_key(settings.api_key, _key(header, credentials))


def require_read_key(settings: Annotated[Settings, Depends(get_settings)],
                     header: Annotated[str | None, Depends(api_key_header)],
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Reads need the API key only with CONCORD_AUTH_READS=true."""
    if settings.auth_reads:
        check_key(settings.api_key, _key(header, credentials))


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
write = [Depends(require_write_key)]
read = [Depends(require_read_key)]
router = APIRouter(prefix="/v1")


# ----- schemas ----------------------------------------------------------------------------------------------

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


def _time(value: float | datetime | None) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return value


def _query(f: Filters) -> SearchQuery:
    return SearchQuery(f.k, f.offset, f.filter, _time(f.added_after), _time(f.added_before), f.match)


def _search_response(answer: SearchAnswer, query: SearchQuery) -> SearchResponse:
    return SearchResponse(query_model=answer.query_model, match=query.match, k=query.k, offset=query.offset,
                          searched_models=answer.searched, skipped_models=answer.skipped,
                          hits=[HitOut(id=h.id, score=h.score, model_id=h.model_id, metadata=h.metadata,
                                       added_at=_datetime(h.added_at)) for h in answer.hits])


def _datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


def _photo(record: Any) -> PhotoOut:
    return PhotoOut(id=record.id, content_hash=record.content_hash, model_id=record.model_id,
                    metadata=record.metadata, added_at=_datetime(record.added_at), has_bytes=record.has_bytes)


def _json_form(text: str | None, field: str) -> Any:
    if text is None or text.strip() == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise Unprocessable(f"the form field {field!r} is not valid JSON ({err})") from None


def _metadata(text: str | None, count: int) -> list[dict[str, Any]]:
    """The `metadata` form field: one JSON object for every photo, or a list with one object per photo."""
    value = _json_form(text, "metadata")
    if value is None:
        return [{} for _ in range(count)]
    if isinstance(value, dict):
        return [dict(value) for _ in range(count)]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        if len(value) != count:
            raise Unprocessable(f"'metadata' lists {len(value)} objects for {count} files; give one per file "
                                f"or a single object for all")
        return value
    raise Unprocessable("'metadata' must be a JSON object, or a list of objects (one per file)")


def _filter(text: str | None) -> dict[str, Scalar] | None:
    value = _json_form(text, "filter")
    if value is not None and (not isinstance(value, dict)
                              or any(isinstance(v, dict | list) for v in value.values())):
        raise Unprocessable("'filter' must be a JSON object of metadata keys and the plain values they must equal")
    return value


# ----- photos -----------------------------------------------------------------------------------------------

@router.post("/photos", dependencies=write, response_model=AddResponse, tags=["photos"])
async def add_photos(
    service: ServiceDep, settings: SettingsDep,
    files: Annotated[list[UploadFile], File(description="One or more photos (JPEG, PNG, WebP, GIF, BMP, TIFF).")],
    metadata: Annotated[str | None, Form(description="JSON: one object for all files, or a list per file.")] = None,
) -> AddResponse:
    """Index photos with the active cloud model; a photo already stored (same sha256) is recognised, not stored
    twice. All or nothing: one bad photo refuses the request and nothing is stored."""
    if len(files) > settings.max_files:
        raise Unprocessable(f"{len(files)} files in one request; the limit is {settings.max_files} "
                            f"(CONCORD_MAX_FILES): send them in batches")
    metas = _metadata(metadata, len(files))
    uploads = [Upload(f.filename or "", await f.read(), meta) for f, meta in zip(files, metas, strict=True)]
    results = await run_in_threadpool(service.add_photos, uploads)
    photos = [PhotoAdded(id=r.id, model_id=r.model_id, duplicate=r.duplicate, filename=u.filename,
                         content_hash=r.content_hash) for r, u in zip(results, uploads, strict=True)]
    duplicates = sum(p.duplicate for p in photos)
    return AddResponse(photos=photos, added=len(photos) - duplicates, duplicates=duplicates)


@router.get("/photos", dependencies=read, response_model=PhotoList, tags=["photos"])
async def find_photos(service: ServiceDep,
                      hash: Annotated[str, Query(min_length=64, max_length=64, pattern="^[0-9a-fA-F]{64}$",
                                                 description="sha256 of the photo file.")]) -> PhotoList:
    """Find a photo by the sha256 of its file (empty list when it is not stored)."""
    found = await run_in_threadpool(service.lookup, [hash])
    records = [await run_in_threadpool(service.record, i) for i in found.values()]
    return PhotoList(photos=[_photo(r) for r in records])


@router.post("/photos/lookup", dependencies=read, response_model=LookupResponse, tags=["photos"])
async def lookup_photos(service: ServiceDep, body: LookupRequest) -> LookupResponse:
    """Which of these sha256 hashes are stored already (what `concord index` skips)."""
    found = await run_in_threadpool(service.lookup, body.hashes)
    return LookupResponse(found=found, missing=[h for h in body.hashes if h not in found])


@router.get("/photos/{photo_id}", dependencies=read, response_model=PhotoOut, tags=["photos"])
async def get_photo(service: ServiceDep, photo_id: int) -> PhotoOut:
    """One photo's record: hash, metadata, the model of its vector, when it was added."""
    return _photo(await run_in_threadpool(service.record, photo_id))


@router.get("/photos/{photo_id}/image", dependencies=read, tags=["photos"],
            responses={200: {"content": {"image/*": {}}, "description": "The photo's bytes."}})
async def get_image(service: ServiceDep, photo_id: int) -> Response:
    """The stored photo, with the media type its bytes show."""
    data, media_type = await run_in_threadpool(service.image, photo_id)
    return Response(content=data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


@router.delete("/photos/{photo_id}", dependencies=write, status_code=204, tags=["photos"])
async def delete_photo(service: ServiceDep, photo_id: int) -> Response:
    """Delete a photo: its record and its vector."""
    await run_in_threadpool(service.delete, photo_id)
    return Response(status_code=204)


@router.get("/photos/{photo_id}/similar", dependencies=read, response_model=SearchResponse, tags=["search"])
async def similar_photos(
    service: ServiceDep, photo_id: int,
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    filter: Annotated[str | None, Query(description='JSON object of metadata equality filters, e.g. '
                                                    '{"album": "2024"}.')] = None,
    added_after: Annotated[datetime | None, Query()] = None,
    added_before: Annotated[datetime | None, Query()] = None,
    match: Annotated[Match, Query(description=MATCH_HELP)] = "similar",
) -> SearchResponse:
    """More like this: photos nearest to a stored photo (itself left out), searched with its own vector
    (with `match=duplicate`: other copies of the same photo first)."""
    query = SearchQuery(k, offset, _filter(filter), _time(added_after), _time(added_before), match)
    return _search_response(await run_in_threadpool(service.similar, photo_id, query), query)


# ----- search -----------------------------------------------------------------------------------------------

@router.post("/search/embedding", dependencies=read, response_model=SearchResponse, tags=["search"])
async def search_embedding(service: ServiceDep, body: EmbeddingQuery) -> SearchResponse:
    """Search with an embedding made elsewhere (a phone's edge model): only gallery vectors of models
    comparable with `model_id` (same space, joined by lineage) are searched."""
    query = _query(body)
    answer = await run_in_threadpool(service.search_vector, body.vector, body.model_id, query)
    return _search_response(answer, query)


@router.post("/search/photo", dependencies=read, response_model=SearchResponse, tags=["search"])
async def search_photo(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="The query photo; the server encodes it with the active model.")],
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
    filter: Annotated[str | None, Form(description="JSON object of metadata equality filters.")] = None,
    added_after: Annotated[datetime | None, Form()] = None,
    added_before: Annotated[datetime | None, Form()] = None,
    match: Annotated[Match, Form(description=MATCH_HELP)] = "similar",
) -> SearchResponse:
    """Search with a photo: the server encodes it with the active cloud model."""
    query = SearchQuery(k, offset, _filter(filter), _time(added_after), _time(added_before), match)
    data = await file.read()
    answer = await run_in_threadpool(service.search_photo, data, query, file.filename or "photo")
    return _search_response(answer, query)


# ----- models and stats -------------------------------------------------------------------------------------

@router.get("/models", dependencies=read, tags=["models"])
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The release: spaces, models, lineage, who may search whom, and the cloud model active for indexing."""
    return await run_in_threadpool(service.models)


@router.post("/models/upgrade", dependencies=write, tags=["models"],
             responses={409: {"description": "The model fails the compatibility gate (verdict included)."}})
async def upgrade_model(service: ServiceDep, body: UpgradeRequest) -> dict[str, Any]:
    """Make a newer cloud model index new photos once it passes the compatibility gate. Nothing is re-encoded:
    stored vectors stay and stay searchable. A model that fails the gate gets 409: it could only start a new
    space, which needs a backfill."""
    return await run_in_threadpool(service.upgrade, body.model_id)


@router.get("/stats", dependencies=read, tags=["models"])
async def stats(service: ServiceDep, verify: Annotated[bool, Query(
        description="Also check that the FAISS index holds exactly the catalogue's photo ids (reads them all).")]
        = False) -> dict[str, Any]:
    """Photos and vectors per model, and the active model."""
    return await run_in_threadpool(service.stats, verify)
