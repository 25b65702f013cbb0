"""Upgrading the indexing model without re-indexing: nothing re-encoded, old vectors kept and still found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.release import Release
from server.service import Service
from tests.server_helpers import GALLERIES, WRITE, add_photos, in_process, release_with_misfits, tiny_settings


@pytest.fixture(params=GALLERIES)
def client(tiny_release: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """A test server, once per gallery backend."""
    with in_process(tiny_settings(tiny_release, tmp_path, request.param)) as test_client:
        yield test_client


def service_of(client: TestClient) -> Service:
    service: Service = client.app.state.service  # type: ignore[attr-defined]
    return service


def add(client: TestClient, photos: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return dict(zip(photos, add_photos(client, photos, [{"name": n} for n in photos]), strict=True))


def upgrade(client: TestClient, model_id: str) -> Any:
    return client.post("/v1/models/upgrade", json={"model_id": model_id}, headers=WRITE)


def test_upgrade_reencodes_nothing_and_edge_queries_find_both_generations(
        client: TestClient, tiny_release: Path, sample_photos: dict[str, bytes]) -> None:
    names = sorted(sample_photos)
    old_names, new_names = names[:3], names[3:]
    service = service_of(client)
    old = add(client, {n: sample_photos[n] for n in old_names})
    assert {p["model_id"] for p in old.values()} == {"cloud-v1"}
    encoded = service.encoded_photos
    assert encoded == len(old_names)
    stored_v1 = {n: service.store.vector(p["id"]).tobytes() for n, p in old.items()}  # type: ignore[union-attr]

    answer = upgrade(client, "cloud-v2")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["reencoded"] == 0 and body["changed"] is True
    assert body["previous"] == "cloud-v1" and body["active_model"] == "cloud-v2"
    assert body["gate"]["passed"] is True and body["gate"]["checks"]
    assert body["seconds"] >= 0
    assert service.encoded_photos == encoded, "the upgrade ran stored photos through an encoder"
    assert client.get("/v1/models").json()["active_model"] == "cloud-v2"

    new = add(client, {n: sample_photos[n] for n in new_names})
    assert {p["model_id"] for p in new.values()} == {"cloud-v2"}
    assert service.encoded_photos == encoded + len(new_names)
    assert client.get("/v1/stats").json()["vectors"] == {"cloud-v1": len(old_names), "cloud-v2": len(new_names)}
    for n, p in old.items():
        assert service.store.vector(p["id"]).tobytes() == stored_v1[n]  # type: ignore[union-attr]
        assert client.get(f"/v1/photos/{p['id']}").json()["model_id"] == "cloud-v1"

    edge = Release.load(tiny_release).encoder("edge-v2")
    ids = {n: p["id"] for n, p in {**old, **new}.items()}
    found_models = set()
    for name in names:
        vector = edge.encode_bytes([sample_photos[name]])[0]
        result = client.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "edge-v2", "k": 6})
        assert result.status_code == 200, result.text
        hits = result.json()["hits"]
        assert result.json()["searched_models"] == ["cloud-v1", "cloud-v2"]
        assert hits[0]["id"] == ids[name], f"edge-v2 query of {name} did not find it first"
        assert len(hits) == len(names)
        found_models.add(hits[0]["model_id"])
    assert found_models == {"cloud-v1", "cloud-v2"}

    late = Release.load(tiny_release).encoder("edge-v1")  # a device that has not updated yet
    vector = late.encode_bytes([sample_photos[new_names[0]]])[0]
    hits = client.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "edge-v1"}).json()["hits"]
    assert hits[0]["id"] == ids[new_names[0]]


@pytest.mark.parametrize("gallery", GALLERIES)
def test_upgrade_is_durable_and_idempotent(tiny_release: Path, tmp_path: Path, sample_photos: dict[str, bytes],
                                           gallery: str) -> None:
    settings = tiny_settings(tiny_release, tmp_path, gallery)
    with in_process(settings) as client:
        add(client, {"a.jpg": sample_photos["astronaut"]})
        assert upgrade(client, "cloud-v2").status_code == 200
        again = upgrade(client, "cloud-v2")
        assert again.status_code == 200 and again.json()["changed"] is False
    with in_process(settings) as client:  # CONCORD_MODEL=cloud-v1 does not undo an upgrade
        assert client.get("/v1/stats").json()["active_model"] == "cloud-v2"
        assert add(client, {"c.jpg": sample_photos["coffee"]})["c.jpg"]["model_id"] == "cloud-v2"
        downgrade = upgrade(client, "cloud-v1")
        assert downgrade.status_code == 409 and "not lower" in downgrade.json()["detail"]


@pytest.mark.parametrize("gallery", GALLERIES)
def test_a_model_failing_the_gate_gets_409_and_changes_nothing(tiny_release: Path, tmp_path: Path,
                                                               sample_photos: dict[str, bytes], gallery: str) -> None:
    release = release_with_misfits(tiny_release, tmp_path / "release")
    with in_process(tiny_settings(release, tmp_path, gallery)) as client:
        add(client, {"a.jpg": sample_photos["astronaut"]})
        before = client.get("/v1/stats").json()
        answer = upgrade(client, "cloud-x")
        assert answer.status_code == 409
        body = answer.json()
        assert body["gate"]["passed"] is False and body["active_model"] == "cloud-v1"
        assert "could only start a new space, which needs a backfill" in body["detail"]
        assert any(not c["passed"] for c in body["gate"]["checks"])
        assert client.get("/v1/stats").json() == before

        assert upgrade(client, "nope").status_code == 404
        edge = upgrade(client, "edge-v2")
        assert edge.status_code == 422 and "only a cloud model indexes photos" in edge.json()["detail"]
        assert client.post("/v1/models/upgrade", json={"model_id": "cloud-v2"}).status_code == 401
        assert client.get("/v1/stats").json() == before


def test_stored_vectors_match_a_fresh_encoding(client: TestClient, tiny_release: Path,
                                               sample_photos: dict[str, bytes]) -> None:
    photo = add(client, {"c.jpg": sample_photos["chelsea"]})["c.jpg"]
    stored = service_of(client).store.vector(photo["id"])
    fresh = Release.load(tiny_release).encoder("cloud-v1").encode_bytes([sample_photos["chelsea"]])[0]
    np.testing.assert_allclose(stored, fresh, atol=1e-5)


def test_a_server_follows_an_upgrade_another_server_made_to_its_gallery(
        tiny_release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Two services over one gallery (two processes on one Milvus collection in a deployment): an upgrade through
    one makes the other index with the new model too; an active model this release lacks is not taken."""
    import server.service
    from server.settings import ACTIVE_MODEL_KEY

    monkeypatch.setattr(server.service, "ACTIVE_REFRESH_S", 3600.0)
    one = Service.open(tiny_settings(tiny_release, tmp_path, "embedded"))
    try:
        two = Service(Release.load(tiny_release), one.store, one.active_model)
        assert one.active_model == two.active_model == "cloud-v1"
        assert one.upgrade("cloud-v2")["changed"] is True
        assert two.active_model == "cloud-v1", "re-read only every ACTIVE_REFRESH_S seconds"
        monkeypatch.setattr(server.service, "ACTIVE_REFRESH_S", 0.0)
        assert two.active_model == "cloud-v2" and two.models()["active_model"] == "cloud-v2"
        one.store.set_setting(ACTIVE_MODEL_KEY, "edge-v1")
        assert two.active_model == "cloud-v2" and "not a cloud model of this release" in caplog.text
    finally:
        one.close()
