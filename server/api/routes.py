"""The HTTP API, versioned under /v1: thin routes that check input and call the `Service` off the event loop.

Status codes (every error body is `ErrorOut`, documented per route): 400 an unparseable body; 401 no API key,
403 a wrong one; 404 an unknown photo (and an unknown model to upgrade to); 409 a query model this gallery cannot
be searched with (unknown to the release, another space, or not joined by lineage), an upgrade the compatibility
gate refuses, a backfill while one runs and an upgrade during a backfill; 413 a request too large (bytes, pixels,
metadata per photo); 415 a file that is no image by its bytes; 422 a photo that cannot be decoded (truncated,
decompression bomb), an embedding of the wrong dim, not finite or not unit norm, refused JSON (NaN, beyond int64,
too deep), an unknown `match`, `match=duplicate` in a space without a photo fingerprint, and a backfill share
outside (0, 1].

Every search takes `match`: `similar` (default; what the photo shows) or `duplicate` (the same photo, cropped,
resized or re-saved: the query's pixel fingerprint counts as much as its semantic part; see `models.match`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from models.match import Match
from server.api.deps import ServiceDep, SettingsDep, parse_filter, parse_metadata, read, write
from server.api.schemas import (
    INT64,
    MATCH_HELP,
    AddResponse,
    BackfillRequest,
    BackfillStatus,
    EmbeddingQuery,
    LookupRequest,
    LookupResponse,
    PhotoAdded,
    PhotoList,
    PhotoOut,
    SearchResponse,
    UpgradeRequest,
    backfill_out,
    errors,
    photo_out,
    search_query,
    search_response,
    to_time,
)
from server.contract import MAX_K, MAX_OFFSET, SearchQuery, Unprocessable, Upload

router = APIRouter(prefix="/v1")
PhotoPath = Annotated[int, Path(ge=0, le=INT64 - 1, description="A photo id (a non-negative 64-bit integer).")]


# ----- photos -----------------------------------------------------------------------------------------------

@router.post("/photos", dependencies=write, response_model=AddResponse, tags=["photos"], responses=errors(415))
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
    metas = parse_metadata(metadata, len(files), settings.max_metadata_bytes)
    uploads = [Upload(f.filename or "", await f.read(), meta) for f, meta in zip(files, metas, strict=True)]
    results = await run_in_threadpool(service.add_photos, uploads)
    photos = [PhotoAdded(id=r.id, model_id=r.model_id, duplicate=r.duplicate, filename=u.filename,
                         content_hash=r.content_hash) for r, u in zip(results, uploads, strict=True)]
    duplicates = sum(p.duplicate for p in photos)
    return AddResponse(photos=photos, added=len(photos) - duplicates, duplicates=duplicates)


@router.get("/photos", dependencies=read, response_model=PhotoList, tags=["photos"], responses=errors())
async def find_photos(service: ServiceDep,
                      hash: Annotated[str, Query(min_length=64, max_length=64, pattern="^[0-9a-fA-F]{64}$",
                                                 description="sha256 of the photo file.")]) -> PhotoList:
    """Find a photo by the sha256 of its file (empty list when it is not stored)."""
    found = await run_in_threadpool(service.lookup, [hash])
    records = [await run_in_threadpool(service.record, i) for i in found.values()]
    return PhotoList(photos=[photo_out(r) for r in records])


@router.post("/photos/lookup", dependencies=read, response_model=LookupResponse, tags=["photos"],
             responses=errors())
async def lookup_photos(service: ServiceDep, body: LookupRequest) -> LookupResponse:
    """Which of these sha256 hashes are stored already (what `concord index` skips)."""
    found = await run_in_threadpool(service.lookup, body.hashes)
    return LookupResponse(found=found, missing=[h for h in body.hashes if h not in found])


@router.get("/photos/{photo_id:int}", dependencies=read, response_model=PhotoOut, tags=["photos"],
            responses=errors(404))
async def getphoto_out(service: ServiceDep, photo_id: PhotoPath) -> PhotoOut:
    """One photo's record: hash, metadata, the model of its vector, when it was added."""
    return photo_out(await run_in_threadpool(service.record, photo_id))


@router.get("/photos/{photo_id:int}/image", dependencies=read, tags=["photos"],
            responses={200: {"content": {"image/*": {}}, "description": "The photo's bytes."}, **errors(404)})
async def get_image(service: ServiceDep, photo_id: PhotoPath) -> Response:
    """The stored photo, with the media type its bytes show."""
    data, media_type = await run_in_threadpool(service.image, photo_id)
    return Response(content=data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


@router.delete("/photos/{photo_id:int}", dependencies=write, status_code=204, tags=["photos"],
               responses=errors(404))
async def deletephoto_out(service: ServiceDep, photo_id: PhotoPath) -> Response:
    """Delete a photo: its record and its vector."""
    await run_in_threadpool(service.delete, photo_id)
    return Response(status_code=204)


@router.get("/photos/{photo_id:int}/similar", dependencies=read, response_model=SearchResponse, tags=["search"],
            responses=errors(404, 409))
async def similar_photos(
    service: ServiceDep, photo_id: PhotoPath,
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
    query = SearchQuery(k, offset, parse_filter(filter), to_time(added_after), to_time(added_before), match)
    return search_response(await run_in_threadpool(service.similar, photo_id, query), query)


# ----- search -----------------------------------------------------------------------------------------------

@router.post("/search/embedding", dependencies=read, response_model=SearchResponse, tags=["search"],
             responses=errors(409))
async def search_embedding(service: ServiceDep, body: EmbeddingQuery) -> SearchResponse:
    """Search with an embedding made elsewhere (a phone's edge model): only gallery vectors of models
    comparable with `model_id` (same space, joined by lineage) are searched."""
    query = search_query(body)
    answer = await run_in_threadpool(service.search_vector, body.vector, body.model_id, query)
    return search_response(answer, query)


@router.post("/search/photo", dependencies=read, response_model=SearchResponse, tags=["search"],
             responses=errors(409, 415))
async def searchphoto_out(
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
    query = SearchQuery(k, offset, parse_filter(filter), to_time(added_after), to_time(added_before), match)
    data = await file.read()
    answer = await run_in_threadpool(service.search_photo, data, query, file.filename or "photo")
    return search_response(answer, query)


# ----- models and stats -------------------------------------------------------------------------------------

@router.get("/models", dependencies=read, tags=["models"], responses=errors())
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The release: spaces, models, lineage, who may search whom, and the cloud model active for indexing."""
    return await run_in_threadpool(service.models)


@router.post("/models/upgrade", dependencies=write, tags=["models"],
             responses=errors(404, 409))
async def upgrade_model(service: ServiceDep, body: UpgradeRequest) -> dict[str, Any]:
    """Make a newer cloud model index new photos once it passes the compatibility gate. Nothing is re-encoded:
    stored vectors stay and stay searchable. A model that fails the gate gets 409: it could only start a new
    space, which needs a backfill."""
    return await run_in_threadpool(service.upgrade, body.model_id)


@router.post("/backfill", dependencies=write, status_code=202, response_model=BackfillStatus, tags=["models"],
             responses=errors(409))
async def start_backfill(service: ServiceDep, body: BackfillRequest | None = None) -> BackfillStatus:
    """Re-encode the stored photos of older models with the active cloud model, from their kept bytes, in the
    background while searches and adds go on; the photos the release's backfill scorers rank highest go first, and
    `share` stops after that part. Resumed after a restart. 409 while one runs (one at a time)."""
    status = await run_in_threadpool(service.start_backfill, body.share if body else 1.0)
    return backfill_out(status)


@router.get("/backfill", dependencies=read, response_model=BackfillStatus, tags=["models"], responses=errors())
async def backfill_status(service: ServiceDep) -> BackfillStatus:
    """The backfill job: state, photos done of the total, skipped and failed ones, rate and ETA."""
    return backfill_out(await run_in_threadpool(service.backfill_status))


@router.get("/stats", dependencies=read, tags=["models"], responses=errors())
async def stats(service: ServiceDep, verify: Annotated[bool, Query(
        description="Also check that the FAISS index holds exactly the catalogue's photo ids (reads them all).")]
        = False) -> dict[str, Any]:
    """Photos and vectors per model, and the active model."""
    return await run_in_threadpool(service.stats, verify)
