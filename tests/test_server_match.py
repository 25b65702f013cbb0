"""`match` on every search: similar (default) or duplicate, which re-weights the query, never stored vectors."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.benchmark.transforms import near_duplicate
from models.manifest import Manifest
from models.match import query_vectors
from models.release import SHIPPED_RELEASE, Release
from server.settings import Settings
from tests.conftest import TINY_FINGERPRINT
from tests.server_helpers import WRITE, add_photos, in_process, tiny_settings

NO_FINGERPRINT = "carries no photo fingerprint; duplicate matching needs a release whose space has one"


@pytest.fixture
def plain(tiny_release: Path, tmp_path: Path) -> Iterator[TestClient]:
    """A server on the tiny release, whose space has no fingerprint."""
    with in_process(tiny_settings(tiny_release, tmp_path)) as client:
        yield client


@pytest.fixture
def printed(fingerprinted_release: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """A server on the tiny release whose models append a photo fingerprint, and that release's folder."""
    with in_process(tiny_settings(fingerprinted_release, tmp_path)) as client:
        yield client, fingerprinted_release


def searches(client: TestClient, photo: bytes, photo_id: int, vector: list[float], match: str
             ) -> dict[str, Any]:
    """The same `match` sent to the three searches, each the way its endpoint takes options."""
    return {
        "embedding": client.post("/v1/search/embedding", json={"vector": vector, "model_id": "cloud-v1",
                                                               "match": match}),
        "photo": client.post("/v1/search/photo", files={"file": ("q.jpg", photo, "image/jpeg")},
                             data={"match": match}),
        "similar": client.get(f"/v1/photos/{photo_id}/similar", params={"match": match}),
    }


def cloud_vectors(release: Path, photos: dict[str, bytes]) -> np.ndarray:
    """What the server stores for these photos: cloud-v1's encoding (computed here, independently)."""
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in photos.values()]
    return np.asarray(Release.load(release).encoder("cloud-v1").encode_images(images), dtype=np.float32)


def test_an_unknown_match_is_refused_on_every_search(plain: TestClient, sample_photos: dict[str, bytes]) -> None:
    added = add_photos(plain, {"c.jpg": sample_photos["chelsea"]})
    dim = Manifest.load(plain.app.state.settings.release).model("cloud-v1").dim
    answers = searches(plain, sample_photos["chelsea"], added[0]["id"], [1.0] + [0.0] * (dim - 1), "exact")
    for name, response in answers.items():
        assert response.status_code == 422, (name, response.text)
        assert "similar" in json.dumps(response.json()["detail"]) and "duplicate" in json.dumps(
            response.json()["detail"]), name


def test_duplicate_without_a_fingerprint_is_refused_plainly(plain: TestClient, sample_photos: dict[str, bytes]
                                                            ) -> None:
    added = add_photos(plain, {"c.jpg": sample_photos["chelsea"]})
    dim = Manifest.load(plain.app.state.settings.release).model("cloud-v1").dim
    answers = searches(plain, sample_photos["chelsea"], added[0]["id"], [1.0] + [0.0] * (dim - 1), "duplicate")
    for name, response in answers.items():
        assert response.status_code == 422, (name, response.text)
        assert response.json()["detail"] == f"space 'tiny' {NO_FINGERPRINT}", name
    similar = searches(plain, sample_photos["chelsea"], added[0]["id"], [1.0] + [0.0] * (dim - 1), "similar")
    assert all(r.status_code == 200 and r.json()["match"] == "similar" for r in similar.values())


def test_duplicate_reweights_the_query_and_never_the_stored_vectors(
        printed: tuple[TestClient, Path], sample_photos: dict[str, bytes]) -> None:
    client, folder = printed
    manifest = Manifest.load(folder)
    space = manifest.spaces["tiny"]
    assert space.fingerprint is not None
    added = add_photos(client, sample_photos)
    ids = [a["id"] for a in added]
    stored = cloud_vectors(folder, sample_photos)
    query = stored[1]
    for match in ("similar", "duplicate"):
        answer = client.post("/v1/search/embedding", json={"vector": query.tolist(), "model_id": "cloud-v1",
                                                           "match": match, "k": len(ids)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["match"] == match
        expected = stored @ query_vectors(query, space, match)  # re-weighted query against untouched vectors
        got = {h["id"]: h["score"] for h in answer.json()["hits"]}
        assert set(got) == set(ids)
        for photo_id, score in zip(ids, expected, strict=True):
            assert got[photo_id] == pytest.approx(float(score), abs=1e-4)
    default = client.post("/v1/search/embedding", json={"vector": query.tolist(), "model_id": "cloud-v1"}).json()
    assert default["match"] == "similar"

    answers = searches(client, sample_photos["coffee"], ids[1], query.tolist(), "duplicate")
    assert all(r.status_code == 200 and r.json()["match"] == "duplicate" for r in answers.values())
    similar = {h["id"]: h["score"] for h in answers["similar"].json()["hits"]}
    assert ids[1] not in similar  # the stored photo itself is left out
    expected = stored @ query_vectors(stored[1], space, "duplicate")
    for i, photo_id in enumerate(ids):
        if photo_id in similar:
            assert similar[photo_id] == pytest.approx(float(expected[i]), abs=1e-4)
    assert answers["photo"].json()["hits"][0]["id"] == ids[list(sample_photos).index("coffee")]

    models = client.get("/v1/models").json()
    assert models["spaces"][0]["fingerprint"] == vars(TINY_FINGERPRINT)
    assert models["spaces"][0]["matches"] == ["similar", "duplicate"]


def duplicate_top_hits(release: Path, data_dir: Path, photos: dict[str, bytes]) -> dict[str, str]:
    """Index `photos` with cloud-v1 through the server; search a near-duplicate of each (cropped, resized, JPEG)
    made by edge-v2's device file in duplicate match; return photo name -> name of the top hit."""
    from edge.choice import device_variant

    manifest = Manifest.load(release)
    dim = manifest.model("edge-v2").dim
    edge = Release.load(release).encoder("edge-v2", device_variant(manifest.model("edge-v2")))
    rng = np.random.default_rng(0)
    settings = Settings(release=release, data_dir=data_dir, model="cloud-v1", api_key=WRITE["X-API-Key"])
    top = {}
    with in_process(settings) as client:
        added = add_photos(client, photos)
        assert {a["model_id"] for a in added} == {"cloud-v1"}
        names = {a["id"]: name for a, name in zip(added, photos, strict=True)}
        for name, data in photos.items():
            copy, _ = near_duplicate(Image.open(io.BytesIO(data)).convert("RGB"), rng)
            vector = edge.encode_images([Image.open(io.BytesIO(copy)).convert("RGB")])[0]
            assert vector.shape == (dim,)
            answer = client.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "edge-v2",
                                                               "match": "duplicate", "k": 3})
            assert answer.status_code == 200, answer.text
            top[name] = names[answer.json()["hits"][0]["id"]]
    return top


def test_duplicate_finds_the_original_from_the_edge(fingerprinted_release: Path, sample_photos: dict[str, bytes],
                                                    tmp_path: Path) -> None:
    top = duplicate_top_hits(fingerprinted_release, tmp_path / "data", sample_photos)
    assert top == {name: name for name in sample_photos}


def test_shipped_release_duplicate_finds_the_original_from_the_edge(
        sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    """End to end with the shipped release: an edge-v2 near-duplicate finds its original in a cloud-v1 gallery."""
    manifest = Manifest.load(SHIPPED_RELEASE)
    space = manifest.spaces[manifest.model("edge-v2").space]
    if space.fingerprint is None:
        pytest.skip(f"the shipped release's space {space.id!r} has no photo fingerprint yet (duplicate match "
                    f"needs one)")
    top = duplicate_top_hits(Path(SHIPPED_RELEASE), tmp_path / "data", sample_photos)
    assert top == {name: name for name in sample_photos}
