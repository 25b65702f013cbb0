"""The search page's routes: the page and its assets (no key: they hold no data), onnxruntime-web's browser
files, the release's model files by id and variant (sha256-verified, for the page's in-browser encoder), and
a page of the library, newest first. The data routes take the same API key as the rest of `/v1`."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from models.manifest import ModelEntry
from models.release import ReleaseError
from server.api.deps import get_service, require_read_key
from server.api.schemas import ErrorOut, PhotoOut, errors, photo_out
from server.contract import NotFound, ServiceError
from server.service import Service
from server.web.assets import find_ort, media_type, ort_file, static_file

ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
"""Cross-origin isolation: lets onnxruntime-web use WebAssembly threads where the device has the cores."""
MAX_PAGE = 200

router = APIRouter()
ServiceDep = Annotated[Service, Depends(get_service)]
read = [Depends(require_read_key)]


class BrokenFile(ServiceError):
    """A release file that is missing or differs from its manifest's sha256: the server will not serve it."""

    status = 500


class ModelFileOut(BaseModel):
    """One ONNX file of a model and where to fetch it."""

    variant: str
    file: str
    sha256: str
    batch: int | None = Field(description="The graph's fixed batch size (1 for device files), None when dynamic.")
    precision: str
    bytes: int
    url: str


class ModelFiles(BaseModel):
    """What a client needs to run a model itself: its files, I/O names, preprocessing and dim."""

    model_id: str
    role: str
    version: int
    dim: int
    input: str
    output: str
    preprocess: dict[str, Any]
    files: list[ModelFileOut]


class LibraryPage(BaseModel):
    """A page of the library, newest photo first."""

    total: int
    offset: int
    limit: int
    photos: list[PhotoOut]


# ----- the page ---------------------------------------------------------------------------------------------

@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The search page (index.html)."""
    path = static_file("index.html")
    if path is None:
        return HTMLResponse("<h1>Concord</h1><p>The search page's files are missing from this installation "
                            "(server/web/static). The API is at <a href='/docs'>/docs</a>.</p>", status_code=500)
    return FileResponse(path, media_type=media_type(path), headers={**ISOLATION, "Cache-Control": "no-cache"})


@router.get("/web/config.json", include_in_schema=False)
async def web_config() -> JSONResponse:
    """What the page needs to know before it starts: whether onnxruntime-web is installed, and where."""
    return JSONResponse({"ort": find_ort().to_dict()}, headers={**ISOLATION, "Cache-Control": "no-store"})


@router.get("/web/ort/{name}", include_in_schema=False)
async def ort_asset(name: str) -> Response:
    """One of onnxruntime-web's browser files, from the npm install beside the server."""
    path = ort_file(name)
    if path is None:
        assets = find_ort()
        detail = assets.to_dict()["hint"] or f"{name!r} is not a file of onnxruntime-web that this page uses"
        return JSONResponse({"detail": detail}, status_code=404, headers=ISOLATION)
    return FileResponse(path, media_type=media_type(path), headers={**ISOLATION, "Cache-Control": "no-cache"})


@router.get("/web/{name}", include_in_schema=False)
async def static_asset(name: str) -> Response:
    """One of the page's own files (scripts, style sheet)."""
    path = static_file(name)
    if path is None:
        return JSONResponse({"detail": f"no page file {name!r}"}, status_code=404, headers=ISOLATION)
    return FileResponse(path, media_type=media_type(path), headers={**ISOLATION, "Cache-Control": "no-cache"})


# ----- model files ------------------------------------------------------------------------------------------

@router.get("/v1/models/{model_id}/files", dependencies=read, response_model=ModelFiles, tags=["models"],
            responses=errors(404))
async def model_files(service: ServiceDep, model_id: str) -> ModelFiles:
    """A model's ONNX files (by variant: `server` is the dynamic-batch fp32 file, `device-*` the batch-1 device
    files), with sha256, size and download URL, and the I/O names, preprocessing and dim to run one."""
    return await run_in_threadpool(_model_files, service, model_id)


def _model_files(service: Service, model_id: str) -> ModelFiles:
    entry = _entry(service, model_id)
    files = []
    for variant, model_file in sorted(entry.files().items()):
        path = service.release.path(model_id, variant)
        size = path.stat().st_size if path.is_file() else 0
        files.append(ModelFileOut(variant=variant, file=model_file.file, sha256=model_file.sha256,
                                  batch=model_file.batch, precision=model_file.precision, bytes=size,
                                  url=f"/v1/models/{model_id}/files/{variant}"))
    return ModelFiles(model_id=entry.id, role=entry.role, version=entry.version, dim=entry.dim, input=entry.input,
                      output=entry.output, preprocess=entry.preprocess.to_dict(), files=files)


@router.get("/v1/models/{model_id}/files/{variant}", dependencies=read, tags=["models"],
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The ONNX file."},
                       304: {"description": "The client holds these bytes already (If-None-Match)."},
                       **errors(404),
                       500: {"model": ErrorOut, "description": "The release file is missing or differs from its "
                                                                "manifest's sha256; it is not served."}})
async def model_file(service: ServiceDep, request: Request, model_id: str, variant: str) -> Response:
    """The bytes of one ONNX file of the release, read-only, checked against the manifest's sha256 before they
    are sent (a changed or damaged file gets 500, never its bytes). The ETag is the sha256."""
    entry = _entry(service, model_id)
    files = entry.files()
    if variant not in files:
        raise NotFound(f"model {model_id!r} has no {variant!r} file; it has {sorted(files)}")
    sha256 = files[variant].sha256
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", **ISOLATION}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data = await run_in_threadpool(_verified_bytes, service, model_id, variant, sha256)
    name = files[variant].file.rsplit("/", 1)[-1]
    headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return Response(content=data, media_type="application/octet-stream", headers=headers)


def _entry(service: Service, model_id: str) -> ModelEntry:
    try:
        return service.manifest.model(model_id)
    except KeyError:
        raise NotFound(f"no model {model_id!r} in this release; it holds {sorted(service.manifest.models)}") from None


def _verified_bytes(service: Service, model_id: str, variant: str, sha256: str) -> bytes:
    try:
        data = service.release.path(model_id, variant).read_bytes()
    except (OSError, ReleaseError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "missing from the release"
        raise BrokenFile(f"model {model_id!r} {variant} file cannot be read ({reason})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise BrokenFile(f"model {model_id!r} {variant} file: sha256 {actual} differs from the manifest's {sha256}; "
                         f"refusing to serve it")
    return data


# ----- the library ------------------------------------------------------------------------------------------

@router.get("/v1/library", dependencies=read, response_model=LibraryPage, tags=["photos"], responses=errors())
async def library(service: ServiceDep, offset: Annotated[int, Query(ge=0)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 48) -> LibraryPage:
    """Browse the library: a page of photo records, newest first."""
    return await run_in_threadpool(_library, service, offset, limit)


def _library(service: Service, offset: int, limit: int) -> LibraryPage:
    ids = service.store.catalogue_ids()
    chosen = ids[::-1][offset:offset + limit]
    records = [record for i in chosen if (record := service.store.get(i)) is not None]
    return LibraryPage(total=len(ids), offset=offset, limit=limit, photos=[photo_out(r) for r in records])
