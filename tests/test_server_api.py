"""The server's API in process (TestClient): photos, search, filters, paging, models, stats, probes, restart."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.schemas import search_response
from server.contract import SearchAnswer, SearchQuery
from server.settings import Settings
from server.store.records import Hit
from tests.server_helpers import API_KEY, GALLERIES, WRITE, in_process, make_photo, tiny_settings
from tests.server_helpers import add_photos as add


@pytest.fixture(params=GALLERIES)
def settings(tiny_release: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The test server's settings, once per gallery backend."""
    return tiny_settings(tiny_release, tmp_path, request.param)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with in_process(settings) as test_client:
        yield test_client


def search_photo(client: TestClient, photo: bytes, **form: Any) -> dict[str, Any]:
    response = client.post("/v1/search/photo", files={"file": ("q.jpg", photo, "image/jpeg")},
                           data={k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items()})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_add_get_image_delete(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    png = make_photo(7, fmt="PNG")
    photos = {"chelsea.jpg": sample_photos["chelsea"], "coffee.jpg": sample_photos["coffee"], "blocks.png": png}
    metas = [{"album": "cats"}, {"album": "food"}, {"album": "art", "n": 3}]
    added = add(client, photos, metas)
    assert [p["duplicate"] for p in added] == [False] * 3
    assert {p["model_id"] for p in added} == {"cloud-v1"}
    cat, _, art = (p["id"] for p in added)

    record = client.get(f"/v1/photos/{art}").json()
    assert record["metadata"] == {"album": "art", "n": 3}
    assert record["model_id"] == "cloud-v1" and record["has_bytes"] is True
    image = client.get(f"/v1/photos/{art}/image")
    assert image.content == png and image.headers["content-type"] == "image/png"
    image = client.get(f"/v1/photos/{cat}/image")
    assert image.content == sample_photos["chelsea"] and image.headers["content-type"] == "image/jpeg"

    assert client.delete(f"/v1/photos/{cat}", headers=WRITE).status_code == 204
    assert client.get(f"/v1/photos/{cat}").status_code == 404
    assert client.delete(f"/v1/photos/{cat}", headers=WRITE).status_code == 404
    stats = client.get("/v1/stats").json()
    assert stats["photos"] == 2 and stats["vectors"] == {"cloud-v1": 2}
    hits = search_photo(client, sample_photos["chelsea"], k=10)["hits"]
    assert cat not in [h["id"] for h in hits] and len(hits) == 2


def test_without_kept_bytes_the_image_is_refused_plainly(settings: Settings, sample_photos: dict[str, bytes]) -> None:
    with in_process(settings.replace(keep_bytes=False)) as client:
        photo = add(client, {"c.jpg": sample_photos["coffee"]})[0]
        assert client.get(f"/v1/photos/{photo['id']}").json()["has_bytes"] is False
        image = client.get(f"/v1/photos/{photo['id']}/image")
        assert image.status_code == 404 and "bytes were not kept" in image.json()["detail"]


def test_duplicates_are_recognised_and_not_encoded_again(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    photo = sample_photos["rocket"]
    first = add(client, {"a.jpg": photo, "b.jpg": photo})
    again = add(client, {"c.jpg": photo})
    assert first[0]["id"] == first[1]["id"] == again[0]["id"]
    assert [first[0]["duplicate"], first[1]["duplicate"], again[0]["duplicate"]] == [False, True, True]
    assert first[0]["content_hash"] == again[0]["content_hash"]
    stats = client.get("/v1/stats").json()
    assert stats["photos"] == 1 and stats["encoded_photos"] == 1


def test_search_finds_the_photo_and_pages_and_filters(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    names = sorted(sample_photos)
    metas = [{"album": "even" if i % 2 == 0 else "odd", "i": i} for i in range(len(names))]
    added = add(client, {n: sample_photos[n] for n in names}, metas)
    ids = dict(zip(names, (p["id"] for p in added), strict=True))

    answer = search_photo(client, sample_photos["chelsea"], k=6)
    assert answer["query_model"] == "cloud-v1" and answer["searched_models"] == ["cloud-v1"]
    hits = answer["hits"]
    assert hits[0]["id"] == ids["chelsea"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert set(hits[0]) == {"id", "score", "metadata", "model_id", "added_at"}

    pages = search_photo(client, sample_photos["chelsea"], k=2)["hits"] + \
        search_photo(client, sample_photos["chelsea"], k=2, offset=2)["hits"]
    assert [h["id"] for h in pages] == [h["id"] for h in hits[:4]]

    odd = search_photo(client, sample_photos["chelsea"], k=6, filter={"album": "odd"})["hits"]
    assert {h["id"] for h in odd} == {ids[n] for n, m in zip(names, metas, strict=True) if m["album"] == "odd"}
    one = search_photo(client, sample_photos["chelsea"], filter={"album": "odd", "i": 1})["hits"]
    assert [h["id"] for h in one] == [ids[names[1]]]

    future = time.time() + 3600
    assert search_photo(client, sample_photos["chelsea"], added_after=str(future))["hits"] == []
    assert len(search_photo(client, sample_photos["chelsea"], k=6, added_before=str(future))["hits"]) == 6
    past = "2000-01-01T00:00:00Z"
    assert search_photo(client, sample_photos["chelsea"], added_before=past)["hits"] == []


def test_similar_leaves_the_photo_itself_out(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    added = add(client, dict(sample_photos), [{"i": i} for i in range(len(sample_photos))])
    target = added[0]["id"]
    answer = client.get(f"/v1/photos/{target}/similar", params={"k": 3}).json()
    assert len(answer["hits"]) == 3 and target not in [h["id"] for h in answer["hits"]]
    everything = client.get(f"/v1/photos/{target}/similar", params={"k": 10}).json()["hits"]
    assert len(everything) == len(sample_photos) - 1
    second_page = client.get(f"/v1/photos/{target}/similar", params={"k": 3, "offset": 3}).json()["hits"]
    assert [h["id"] for h in answer["hits"] + second_page] == [h["id"] for h in everything[:6]]
    odd = client.get(f"/v1/photos/{target}/similar", params={"filter": json.dumps({"i": 1})}).json()["hits"]
    assert [h["id"] for h in odd] == [added[1]["id"]]
    assert client.get("/v1/photos/999999/similar").status_code == 404


def test_lookup_by_content_hash(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    added = add(client, {"coffee.jpg": sample_photos["coffee"]})[0]
    digest = added["content_hash"]
    found = client.get("/v1/photos", params={"hash": digest}).json()["photos"]
    assert [p["id"] for p in found] == [added["id"]]
    assert client.get("/v1/photos", params={"hash": "0" * 64}).json()["photos"] == []
    answer = client.post("/v1/photos/lookup", json={"hashes": [digest, "f" * 64]}).json()
    assert answer == {"found": {digest: added["id"]}, "missing": ["f" * 64]}


def test_models_and_stats_describe_the_release(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    add(client, {"a.jpg": sample_photos["astronaut"]})
    models = client.get("/v1/models").json()
    assert models["active_model"] == "cloud-v1"
    by_id = {m["id"]: m for m in models["models"]}
    assert set(by_id) == {"cloud-v1", "edge-v1", "cloud-v2", "edge-v2"}
    assert by_id["cloud-v1"]["active"] and not by_id["cloud-v2"]["active"]
    assert by_id["cloud-v1"]["gallery_vectors"] == 1
    assert by_id["edge-v2"]["parents"] == ["cloud-v2", "edge-v1"]
    assert "cloud-v1" in by_id["edge-v2"]["searches"]
    assert {"model": "cloud-v2", "parent": "cloud-v1"} in models["lineage"]
    assert models["spaces"] == [{"id": "tiny", "dim": 32, "metric": "inner_product", "fingerprint": None,
                                 "matches": ["similar"], "models": ["cloud-v1", "cloud-v2", "edge-v1", "edge-v2"]}]
    stats = client.get("/v1/stats").json()
    assert stats["photos"] == 1 and stats["vectors"] == {"cloud-v1": 1} and stats["active_model"] == "cloud-v1"


def test_probes_metrics_and_docs(client: TestClient, sample_photos: dict[str, bytes]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    add(client, {"a.jpg": sample_photos["astronaut"]})
    search_photo(client, sample_photos["astronaut"])
    text = client.get("/metrics").text
    assert 'concord_http_requests_total{method="POST",route="/v1/photos",status="200"} 1.0' in text
    assert 'concord_photos_indexed_total{model="cloud-v1"} 1.0' in text
    assert 'concord_searches_total{kind="photo",model="cloud-v1"} 1.0' in text
    assert 'concord_encode_seconds_count{model="cloud-v1"} 2.0' in text
    assert 'concord_gallery_vectors{model="cloud-v1"} 1.0' in text
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/photos", "/v1/photos/{photo_id}", "/v1/photos/{photo_id}/image", "/v1/photos/{photo_id}/similar",
                 "/v1/search/photo", "/v1/search/embedding", "/v1/models", "/v1/models/upgrade", "/v1/stats"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_reads_need_the_key_when_configured(settings: Settings, sample_photos: dict[str, bytes]) -> None:
    with in_process(settings.replace(auth_reads=True)) as client:
        assert client.get("/v1/stats").status_code == 401
        assert client.get("/v1/stats", headers={"X-API-Key": "nope"}).status_code == 403
        assert client.get("/v1/stats", headers=WRITE).status_code == 200
        assert client.get("/v1/stats", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_search_answers_are_identical_after_a_clean_restart(settings: Settings,
                                                           sample_photos: dict[str, bytes]) -> None:
    def answers(client: TestClient) -> list[Any]:
        out: list[Any] = [search_photo(client, photo, k=4) for photo in sample_photos.values()]
        out.append(client.get("/v1/photos/1/similar", params={"k": 3}).json())
        out.append(client.get("/v1/stats").json()["vectors"])
        return out

    with in_process(settings) as client:
        add(client, dict(sample_photos), [{"i": i} for i in range(len(sample_photos))])
        before = answers(client)
    with in_process(settings) as client:
        after = answers(client)
        assert client.get("/v1/models").json()["active_model"] == "cloud-v1"
    assert after == before


def test_scores_are_cosines_even_when_float32_rounding_passes_one() -> None:
    """The shipped cloud-v3 scores a photo against its own stored vector 1.0000005; the API says 1.0 (order kept)."""
    hits = [Hit(1, 1.0000004768371582, "cloud-v3", {}, 0.0), Hit(2, 0.5, "cloud-v3", {}, 0.0),
            Hit(3, -1.0000002, "cloud-v3", {}, 0.0)]
    body = search_response(SearchAnswer("cloud-v3", ["cloud-v3"], {}, hits), SearchQuery())
    assert [(h.id, h.score) for h in body.hits] == [(1, 1.0), (2, 0.5), (3, -1.0)]
