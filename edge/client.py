"""The device side of a search: encode photos here, send only their embeddings to a Concord server.

`encode_photos` runs the edge encoder of a release (int8 when quantised); `ConcordClient` is the one client of
the server's `/v1` API: it posts an embedding to `POST /v1/search/embedding` (match `similar` or `duplicate`)
and returns the hits (the photo's bytes never leave the device), and it uploads photos, looks up their hashes,
upgrades the model and reads stats for `concord index` and the benchmarks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edge.choice import device_variant
from models.match import MATCHES
from models.preprocess import load_image

RETRIES = 3
"""Attempts per request for a caller that asks to retry (the indexer: the server may be restarting)."""


class ApiError(RuntimeError):
    """The server could not be reached, refused the request, or answered something unreadable.

    `status` is the HTTP status of a refusal (None when no answer came) and `detail` the server's own
    explanation (FastAPI's `detail`), so a caller can tell a bad photo (422) from a wrong API key (401/403).
    """

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Encoded:
    """Embeddings of photos made on this device, with the model and file that made them."""

    model_id: str
    variant: str
    photos: list[str]
    vectors: np.ndarray


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float
    model_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


def encode_photos(release_folder: str | Path, photos: Sequence[str | Path], model_id: str | None = None,
                  variant: str | None = None, threads: int | None = None) -> Encoded:
    """Encode photos with an edge model of the release (default: newest edge, device int8 if present).

    Raises `ImageError` naming the first photo that is missing or cannot be decoded, before encoding any.
    """
    from models.release import Release

    release = Release.load(release_folder, verify=True)
    entry = release.manifest.model(model_id) if model_id else release.manifest.newest("edge")
    variant = variant or device_variant(entry)
    images = [load_image(photo) for photo in photos]
    vectors = release.encoder(entry.id, variant, threads=threads).encode_images(images)
    return Encoded(entry.id, variant, [str(p) for p in photos], np.asarray(vectors, dtype=np.float32))


@dataclass(frozen=True)
class SearchResult:
    """The server's answer: hits best first, and which gallery models it searched or skipped (and why)."""

    hits: list[Hit]
    searched_models: list[str] = field(default_factory=list)
    skipped_models: dict[str, str] = field(default_factory=dict)


class ConcordClient:
    """The one HTTP client of the server's `/v1` API (API key in `X-API-Key`); each call returns the JSON answer.

    `retries` attempts a request again when the server cannot be reached (uploads are idempotent: the server
    keeps one record per photo hash). Every refusal raises `ApiError` with the status and the server's detail.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0, retries: int = 1) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ApiError(f"server URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.retries = max(1, retries)
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> ConcordClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def search_embedding(self, vector: np.ndarray, model_id: str, k: int = 10, match: str = "similar"
                         ) -> SearchResult:
        """`POST /v1/search/embedding` with one embedding made by `model_id`; the hits, best first.

        `match="duplicate"` asks for the same photo (cropped, resized, re-saved) rather than similar ones; the
        server re-weights the query (it needs a release whose space has a photo fingerprint).
        """
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise ApiError(f"expected one finite embedding vector, got shape {vector.shape}")
        if match not in MATCHES:
            raise ApiError(f"unknown match {match!r}; use one of {', '.join(MATCHES)}")
        body = {"vector": [float(x) for x in vector], "model_id": model_id, "k": int(k), "match": match}
        return self._result("/v1/search/embedding", self.request("POST", "/v1/search/embedding", json=body))

    def search_photo(self, name: str, data: bytes, k: int = 10) -> SearchResult:
        """`POST /v1/search/photo`: the server encodes the photo itself; the hits, best first."""
        answer = self.request("POST", "/v1/search/photo", files={"file": (Path(name).name, data, "image/jpeg")},
                              data={"k": str(k)})
        return self._result("/v1/search/photo", answer)

    def lookup(self, hashes: Sequence[str]) -> dict[str, int]:
        """`POST /v1/photos/lookup`: which of these sha256 hashes the server holds, hash -> photo id."""
        return dict(self.request("POST", "/v1/photos/lookup", json={"hashes": list(hashes)})["found"])

    def add_photos(self, photos: Sequence[tuple[str, bytes]], metadata: Sequence[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
        """`POST /v1/photos`: one multipart request of (name, bytes), with one metadata object per photo."""
        files = [("files", (Path(name).name, data, "application/octet-stream")) for name, data in photos]
        form = {"metadata": json.dumps(list(metadata))} if metadata is not None else None
        return self.request("POST", "/v1/photos", files=files, data=form)

    def upgrade(self, model_id: str) -> dict[str, Any]:
        """`POST /v1/models/upgrade`: make `model_id` the model that indexes new photos."""
        return self.request("POST", "/v1/models/upgrade", json={"model_id": model_id})

    def stats(self) -> dict[str, Any]:
        """`GET /v1/stats`."""
        return self.request("GET", "/v1/stats")

    def models(self) -> dict[str, Any]:
        """`GET /v1/models`."""
        return self.request("GET", "/v1/models")

    def ready(self) -> dict[str, Any]:
        """`GET /readyz`: the answer when the server is ready; ApiError (503, or unreachable) while it is not."""
        return self.request("GET", "/readyz")

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request (again while the server is unreachable, up to `retries` attempts); the JSON object."""
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as err:
                if attempt < self.retries - 1:
                    time.sleep(0.5 * 2 ** attempt)
                elif isinstance(err, httpx.TimeoutException):
                    raise ApiError(f"{url}: the server did not answer within {self._http.timeout.read} s") from None
                else:
                    raise ApiError(f"cannot reach the server at {self.base_url} ({err})") from None
        if response.status_code >= 400:
            detail = _message(response)
            raise ApiError(f"{method} {url}: the server answered {response.status_code}: {detail}",
                           response.status_code, detail)
        try:
            answer = response.json()
        except ValueError:
            raise ApiError(f"{url}: the answer is not JSON: {response.text[:200]!r}") from None
        if not isinstance(answer, dict):
            raise ApiError(f"{url}: expected a JSON object, got {type(answer).__name__}")
        return answer

    def _result(self, path: str, answer: dict[str, Any]) -> SearchResult:
        try:
            hits = [Hit(id=int(h["id"]), score=float(h["score"]), model_id=str(h["model_id"]),
                        metadata=dict(h.get("metadata") or {})) for h in answer["hits"]]
            return SearchResult(hits, [str(m) for m in answer.get("searched_models") or []],
                                {str(m): str(why) for m, why in (answer.get("skipped_models") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ApiError(f"{self.base_url}{path}: the answer has no readable hits ({err!r})") from None


def _message(response: httpx.Response) -> str:
    """The server's own explanation of an error: FastAPI's `detail`, an `error` field, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if key in body:
                detail = body[key]
                if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}]
                    return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                                     if isinstance(d, dict) else str(d) for d in detail)
                return detail if isinstance(detail, str) else str(detail)
    return str(body)[:500]


def format_hits(result: SearchResult) -> str:
    """Hits as a plain-text table (rank, id, score, model id, metadata), then the gallery models skipped."""
    lines = [f"{'rank':>4}  {'id':>10}  {'score':>7}  {'model':<12} metadata"] if result.hits else ["no hits"]
    lines += [f"{i:>4}  {h.id:>10}  {h.score:>7.4f}  {h.model_id:<12} {json.dumps(h.metadata, sort_keys=True)}"
              for i, h in enumerate(result.hits, 1)]
    if result.searched_models:
        lines.append(f"searched gallery vectors of: {', '.join(result.searched_models)}")
    lines += [f"not searched: {model} ({why})" for model, why in result.skipped_models.items()]
    return "\n".join(lines)
