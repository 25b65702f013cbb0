"""The Concord photo-search server: `create_app(settings)` builds the FastAPI app.

Its lifespan opens the release (sha256-verified) and the gallery store, and closes the store (saving the
FAISS index) at shutdown. Routes live in `server.api` (routes, schemas, deps); the blocking work in `server.service`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from server.api import router
from server.api.schemas import validation_message
from server.contract import ServiceError
from server.docs import add_docs
from server.metrics import Metrics, RequestMetrics
from server.security import AuthError, BodyLimit
from server.service import Service
from server.settings import Settings
from server.web import router as web_router

log = logging.getLogger("concord.server")
DESCRIPTION = """Photo search whose models never force a re-index.

A cloud encoder indexes photos; phones search with embeddings from a small edge encoder of the same space.
Upgrading the cloud model (`POST /v1/models/upgrade`) re-encodes nothing: old vectors stay searchable beside the
new model's. Where re-encoding pays, `POST /v1/backfill` does it in the background from the kept photo bytes (the
photos whose old vectors the new model moves most first), resumable, while searches go on. Writes need the API key
(`X-API-Key`) when one is configured.

Every search takes `match`: `similar` (default: photos that show the same kind of thing) or `duplicate` (the same
photo, cropped, resized or re-saved: the query's pixel fingerprint counts as much as what it shows; it needs a
release whose space has a photo fingerprint, see `GET /v1/models`). The answer echoes it.

Errors answer `{"detail": "<what was wrong>"}` (schema `ErrorOut`; a 422 for invalid fields adds `errors`, one item
per field): 400 a body that cannot be parsed (JSON nested too deeply); 401 no API key, 403 a wrong one; 404 an
unknown photo, or an unknown model to upgrade to; 405 a method a path does not take; 409 a query model this gallery
cannot be searched with (not in the release, another space, or not joined by lineage: the message says which), an
upgrade refused by the compatibility gate (the verdict is included), a backfill while one runs and an upgrade
during a backfill; 413 a request body over CONCORD_MAX_REQUEST_BYTES (64 MiB), new photos over
CONCORD_MAX_REQUEST_PIXELS (512 MP by their headers) or one photo's metadata over CONCORD_MAX_METADATA_BYTES (4 KiB
of JSON); 415 a file that is no image by its bytes; 422 a photo that cannot be decoded (truncated, over the 40 MP
decompression-bomb guard), an embedding of the wrong dim, not finite or not unit norm, an unknown `match` or
`duplicate` in a space without a fingerprint, JSON the server refuses in `metadata` or `filter` (NaN, Infinity,
numbers beyond a float or int64, nested more than 8 deep), or a missing or invalid field (photo ids are 0..2^63-1,
k at most 100, a backfill share in (0, 1]). Every check runs before anything is decoded or encoded, and a refused
request changes nothing.
"""


def create_app(settings: Settings | None = None, shared: bool = False) -> FastAPI:
    """Build the app; the release and the store open when it starts (lifespan), not here. `shared`: the app of one
    of several worker processes serving one store (`concord serve --workers N`)."""
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(Service.open, settings, metrics, shared)
        log.info("serving release %s (active model %s) with the store in %s", service.release_name,
                 service.active_model, settings.data_dir)
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await run_in_threadpool(service.close)

    app = FastAPI(title="Concord", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.include_router(router)
    app.include_router(web_router)  # the search page at / and the model files it runs
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it counts 413s too
    _add_handlers(app)
    _add_probes(app, metrics)
    add_docs(app)
    return app


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_field(request: Request, exc: RequestValidationError) -> JSONResponse:
        items = [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                  "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": validation_message(items), "errors": items}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        if isinstance(exc.__cause__, RecursionError):
            detail = "the JSON body nests arrays or objects too deeply to read; filters take plain values"
        return JSONResponse({"detail": str(detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)



def _add_probes(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "Release or store not open yet."}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the release and the store are open."""
        service: Service | None = request.app.state.service
        if service is None:
            return JSONResponse({"status": "starting", "detail": "release and store are not open"}, status_code=503)
        return JSONResponse({"status": "ready", "release": service.release_name,
                             "active_model": service.active_model})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus metrics: request counts and latency by route, photos indexed, searches, encode time."""
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
