"""The device side of a search: encode photos here, send only their embeddings to a Concord server.

`encode_photos` runs the edge encoder of a release (int8 when quantised); `SearchClient` posts an
embedding to `POST /v1/search/embedding` (match `similar` or `duplicate`) and returns the hits. The photo's
bytes never leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edge.choice import device_variant
from models.match import MATCHES
from models.preprocess import load_image

SEARCH_PATH = "/v1/search/embedding"


class SearchError(RuntimeError):
    """The server could not be reached, refused the request, or answered something unreadable."""


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


class SearchClient:
    """A small HTTP client of the server's search-by-embedding endpoint (API key in `X-API-Key`)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise SearchError(f"server URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def search_embedding(self, vector: np.ndarray, model_id: str, k: int = 10, match: str = "similar"
                         ) -> SearchResult:
        """Search the gallery with one embedding made by `model_id`; return the hits, best first.

        `match="duplicate"` asks for the same photo (cropped, resized, re-saved) rather than similar ones; the
        server re-weights the query (it needs a release whose space has a photo fingerprint).
        """
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise SearchError(f"expected one finite embedding vector, got shape {vector.shape}")
        if match not in MATCHES:
            raise SearchError(f"unknown match {match!r}; use one of {', '.join(MATCHES)}")
        body = {"vector": [float(x) for x in vector], "model_id": model_id, "k": int(k), "match": match}
        answer = self._post(SEARCH_PATH, body)
        try:
            hits = [Hit(id=int(h["id"]), score=float(h["score"]), model_id=str(h["model_id"]),
                        metadata=dict(h.get("metadata") or {})) for h in answer["hits"]]
            return SearchResult(hits, [str(m) for m in answer.get("searched_models") or []],
                                {str(m): str(why) for m, why in (answer.get("skipped_models") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SearchError(f"{self.base_url}{SEARCH_PATH}: the answer has no readable hits ({err!r})") from None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.post(path, json=body)
        except httpx.TimeoutException:
            raise SearchError(f"{url}: the server did not answer within {self._http.timeout.read} s") from None
        except httpx.TransportError as err:
            raise SearchError(f"cannot reach the server at {self.base_url} ({err})") from None
        if response.status_code >= 400:
            raise SearchError(f"{url}: the server answered {response.status_code}: {_message(response)}")
        try:
            answer = response.json()
        except ValueError:
            raise SearchError(f"{url}: the answer is not JSON: {response.text[:200]!r}") from None
        if not isinstance(answer, dict):
            raise SearchError(f"{url}: expected a JSON object, got {type(answer).__name__}")
        return answer


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
    import json

    lines = [f"{'rank':>4}  {'id':>10}  {'score':>7}  {'model':<12} metadata"] if result.hits else ["no hits"]
    lines += [f"{i:>4}  {h.id:>10}  {h.score:>7.4f}  {h.model_id:<12} {json.dumps(h.metadata, sort_keys=True)}"
              for i, h in enumerate(result.hits, 1)]
    if result.searched_models:
        lines.append(f"searched gallery vectors of: {', '.join(result.searched_models)}")
    lines += [f"not searched: {model} ({why})" for model, why in result.skipped_models.items()]
    return "\n".join(lines)
