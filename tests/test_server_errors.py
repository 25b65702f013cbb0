"""Every bad input gets its status code and a message saying what was wrong, and leaves the store unchanged.

Codes: 401 no API key, 403 a wrong one; 404 an unknown photo or an unknown model to upgrade to; 409 a query
model the gallery cannot be searched with (unknown to the release, another space, not joined by lineage);
413 too large; 415 not an image by its bytes; 422 undecodable photo (truncated, decompression bomb), bad
embedding (dim, NaN, norm) or a missing/invalid field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server_helpers import (
    GALLERIES,
    WRITE,
    bomb_png,
    in_process,
    make_photo,
    release_with_misfits,
    tiny_settings,
    unit,
)

LIMIT = 400_000


@pytest.fixture(scope="module", params=GALLERIES)
def client(tiny_release: Path, tmp_path_factory: pytest.TempPathFactory, sample_photos: dict[str, bytes],
           request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """A server whose gallery holds three photos; its release adds models that may not search it (per backend)."""
    tmp = tmp_path_factory.mktemp("errors")
    release = release_with_misfits(tiny_release, tmp / "release")
    with in_process(tiny_settings(release, tmp, request.param, max_request_bytes=LIMIT)) as test_client:
        files = [("files", (n, sample_photos[n], "image/jpeg")) for n in ("chelsea", "coffee", "rocket")]
        assert test_client.post("/v1/photos", files=files, headers=WRITE).status_code == 200
        yield test_client


def upload(*files: tuple[str, bytes], headers: dict[str, str] | None = WRITE,
           **data: str) -> Callable[[TestClient], httpx.Response]:
    return lambda c: c.post("/v1/photos", files=[("files", (n, b, "image/jpeg")) for n, b in files], data=data,
                            headers=headers)


def embedding(vector: Any, model_id: str = "edge-v2", **extra: Any) -> Callable[[TestClient], httpx.Response]:
    body = json.dumps({"vector": vector, "model_id": model_id, **extra})  # json allows NaN, as a client might send
    return lambda c: c.post("/v1/search/embedding", content=body, headers={"Content-Type": "application/json"})


def search_photo(data: bytes) -> Callable[[TestClient], httpx.Response]:
    return lambda c: c.post("/v1/search/photo", files={"file": ("q.jpg", data, "image/jpeg")})


GOOD = unit([1.0] * 32)
JPEG = make_photo(1)
TEXT = b"Dear diary, this is not a photo at all.\n" * 20
TRUNCATED = make_photo(2, size=256)[:1500]

CASES: dict[str, tuple[Callable[[TestClient], httpx.Response], int, str]] = {
    "no api key": (upload(("a.jpg", JPEG), headers=None), 401, "needs an API key"),
    "wrong api key": (upload(("a.jpg", JPEG), headers={"X-API-Key": "guess"}), 403, "not valid"),
    "delete without key": (lambda c: c.delete("/v1/photos/1"), 401, "needs an API key"),
    "upgrade without key": (lambda c: c.post("/v1/models/upgrade", json={"model_id": "cloud-v2"}), 401, "API key"),
    "too big": (upload(("big.jpg", JPEG + b"\0" * LIMIT)), 413, "larger than this server's limit"),
    "text claimed as jpeg": (upload(("diary.jpg", TEXT)), 415, "not a photo"),
    "one bad photo among good ones": (upload(("ok.jpg", make_photo(3)), ("diary.jpg", TEXT)), 415, "diary.jpg"),
    "empty file": (upload(("empty.jpg", b"")), 422, "empty"),
    "truncated jpeg": (upload(("cut.jpg", TRUNCATED)), 422, "truncated"),
    "decompression bomb": (upload(("bomb.png", bomb_png())), 422, "decompression bomb"),
    "over the pixel limit": (upload(("big.png", bomb_png(7000, 7000))), 422, "decompression-bomb guard"),
    "metadata not json": (upload(("a.jpg", JPEG), metadata="{oops"), 422, "not valid JSON"),
    "metadata count": (upload(("a.jpg", JPEG), metadata='[{"a": 1}, {"a": 2}]'), 422, "one per file"),
    "missing file field": (lambda c: c.post("/v1/photos", data={"metadata": "{}"}, headers=WRITE), 422, "files"),
    "query photo is text": (search_photo(TEXT), 415, "not a photo"),
    "query photo truncated": (search_photo(TRUNCATED), 422, "truncated"),
    "wrong dim": (embedding(unit([1.0] * 16)), 422, "embeds into 32 dimensions"),
    "nan": (embedding([math.nan, *GOOD[1:]]), 422, "NaN"),
    "infinite": (embedding([math.inf, *GOOD[1:]]), 422, "NaN or infinite"),
    "not unit norm": (embedding([2 * x for x in GOOD]), 422, "L2 norm 2.000000"),
    "bad k": (embedding(GOOD, k=0), 422, "k"),
    "unknown model": (embedding(GOOD, model_id="edge-v9"), 409, "unknown query model 'edge-v9'"),
    "another space": (embedding(GOOD, model_id="other-v1"), 409, "space 'other'"),
    "not joined by lineage": (embedding(GOOD, model_id="indie-v1"), 409, "not joined by lineage"),
    "unknown photo": (lambda c: c.get("/v1/photos/424242"), 404, "no photo with id 424242"),
    "unknown photo image": (lambda c: c.get("/v1/photos/424242/image"), 404, "no photo"),
    "unknown photo delete": (lambda c: c.delete("/v1/photos/424242", headers=WRITE), 404, "no photo"),
    "unknown photo similar": (lambda c: c.get("/v1/photos/424242/similar"), 404, "no photo"),
    "upgrade to unknown model": (lambda c: c.post("/v1/models/upgrade", json={"model_id": "cloud-v9"},
                                                  headers=WRITE), 404, "unknown model 'cloud-v9'"),
    "upgrade failing the gate": (lambda c: c.post("/v1/models/upgrade", json={"model_id": "cloud-x"},
                                                  headers=WRITE), 409, "needs a backfill"),
    "photo id beyond int64": (lambda c: c.get(f"/v1/photos/{2**63}"), 422, "less than or equal to 9223372036854775807"),
    "image id beyond int64": (lambda c: c.get(f"/v1/photos/{2**64}/image"), 422, "photo_id"),
    "delete id beyond int64": (lambda c: c.delete(f"/v1/photos/{2**63}", headers=WRITE), 422, "photo_id"),
    "similar id beyond int64": (lambda c: c.get(f"/v1/photos/{2**63}/similar"), 422, "photo_id"),
    "negative photo id": (lambda c: c.get("/v1/photos/-1"), 404, "Not Found"),
    "lookup is a POST": (lambda c: c.get("/v1/photos/lookup"), 405, "Method Not Allowed"),
    "metadata NaN": (upload(("a.jpg", JPEG), metadata='{"a": NaN}'), 422, "NaN and Infinity are refused"),
    "metadata 1e400": (upload(("a.jpg", JPEG), metadata='{"a": 1e400}'), 422, "beyond the range of a float"),
    "metadata int beyond int64": (upload(("a.jpg", JPEG), metadata=f'{{"a": {2**63}}}'), 422, "64-bit integer"),
    "metadata nested deeply": (upload(("a.jpg", JPEG), metadata='{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"),
                               422, "nested too deeply"),
    "metadata nested 9 deep": (upload(("a.jpg", JPEG), metadata='{"a": ' + "[" * 8 + "]" * 8 + "}"), 422,
                               "more than 8 deep"),
    "metadata too large": (upload(("a.jpg", JPEG), metadata=json.dumps({"a": "x" * 5000})), 413,
                           "CONCORD_MAX_METADATA_BYTES"),
    "request over the pixel budget": (upload(*[(f"p{i}.png", bomb_png(6000 + i, 6000)) for i in range(15)]), 413,
                                      "CONCORD_MAX_REQUEST_PIXELS"),
    "filter value beyond int64": (embedding(GOOD, filter={"a": 2**63}), 422, "64-bit range"),
    "filter value infinite": (embedding(GOOD, filter={"a": math.inf}), 422, "finite number"),
    "filter nested deeply": (lambda c: c.post("/v1/search/embedding", content='{"model_id": "edge-v2", "filter": '
                                              + "[" * 50_000 + "]" * 50_000 + "}",
                                              headers={"Content-Type": "application/json"}), 400, "too deeply"),
    "similar filter beyond int64": (lambda c: c.get("/v1/photos/1/similar", params={"filter": f'{{"a": {2**63}}}'}),
                                    422, "64-bit integer"),
    "photo filter nested deeply": (lambda c: c.post("/v1/search/photo", files={"file": ("q.jpg", JPEG, "image/jpeg")},
                                                    data={"filter": '{"a": ' + "[" * 5000 + "]" * 5000 + "}"}),
                                   422, "nested too deeply"),
    "k above the cap": (embedding(GOOD, k=101), 422, "less than or equal to 100"),
}


def test_every_validation_error_is_one_line_with_its_fields(client: TestClient) -> None:
    """A 422 for an invalid field answers the documented ErrorOut: a one-line `detail` and the `errors` list."""
    answer = client.post("/v1/search/embedding", json={"vector": "x", "model_id": "edge-v2", "k": 0}).json()
    assert isinstance(answer["detail"], str) and "body.k" in answer["detail"]
    assert {tuple(e["loc"]) for e in answer["errors"]} == {("body", "vector"), ("body", "k")}
    documented = client.get("/openapi.json").json()["paths"]["/v1/search/embedding"]["post"]["responses"]
    assert {"400", "401", "403", "409", "413", "422", "503"} <= set(documented)
    assert documented["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")


def snapshot(client: TestClient) -> dict[str, Any]:
    stats = client.get("/v1/stats").json()
    stats.pop("encoded_photos")
    ids = [p["id"] for p in client.post("/v1/search/embedding", json={"vector": GOOD, "model_id": "cloud-v1",
                                                                       "k": 100}).json()["hits"]]
    return {"stats": stats, "ids": sorted(ids)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly_and_changes_nothing(client: TestClient, case: str) -> None:
    send, status, fragment = CASES[case]
    before = snapshot(client)
    response = send(client)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert fragment in text, text
    assert snapshot(client) == before


def test_a_partly_comparable_query_reports_what_it_skipped(client: TestClient) -> None:
    """A model joined to the gallery's models searches them; the answer says which models it searched."""
    answer = client.post("/v1/search/embedding", json={"vector": GOOD, "model_id": "edge-v1"}).json()
    assert answer["searched_models"] == ["cloud-v1"] and answer["skipped_models"] == {}
    assert len(answer["hits"]) == 3


def test_a_streamed_body_past_the_limit_is_cut_off_with_413(client: TestClient) -> None:
    """No Content-Length (chunked upload): the limit is enforced on the bytes as they arrive."""
    before = snapshot(client)

    def chunks() -> Iterator[bytes]:
        yield b'{"model_id": "edge-v2", "vector": ['
        for _ in range(LIMIT // 1000 + 10):
            yield b"0.0," * 250
        yield b"1.0]}"

    response = client.post("/v1/search/embedding", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit of 400,000 bytes" in response.json()["detail"]
    assert snapshot(client) == before
