"""The shipped default release: it verifies, fits the size budget, and serves real searches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from models.release import SHIPPED_RELEASE, Release
from server.settings import Settings
from tests.server_helpers import WRITE, add_photos, in_process


def test_shipped_release_verifies_and_fits_its_size_budget() -> None:
    """Three cloud generations (the files that made users' vectors, kept as they shipped) and three edge ones:
    85 MB (60 MB held the four models of v1 and v2; cloud-v3 adds its fp16-stored file, edge-v3 its int8 one)."""
    release = Release.load(SHIPPED_RELEASE)
    assert sorted(release.manifest.models) == ["cloud-v1", "cloud-v2", "cloud-v3", "edge-v1", "edge-v2", "edge-v3"]
    sizes = sum(path.stat().st_size for path in Path(SHIPPED_RELEASE).glob("*.onnx"))
    assert sizes <= 85_000_000
    for entry in release.manifest.models.values():
        assert "CC BY 4.0" in entry.card["training_data"] and entry.card["recipe"]
        assert entry.metrics["matrix"][entry.id]


def test_default_server_answers_readyz_and_finds_a_photo_from_the_edge(
        sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    """`concord serve`'s defaults: the shipped release; a query of the newest edge model (edge-v3, int8)
    finds its own photo first."""
    settings = Settings(release=SHIPPED_RELEASE, data_dir=tmp_path / "data", api_key=WRITE["X-API-Key"])
    release = Release.load(SHIPPED_RELEASE)
    edge_id = release.manifest.newest("edge").id
    assert edge_id == "edge-v3"
    edge = release.encoder(edge_id, "device-int8")
    with in_process(settings) as client:
        assert client.get("/readyz").status_code == 200
        added = add_photos(client, sample_photos)
        # a new store indexes with the newest cloud model
        assert {a["model_id"] for a in added} == {release.manifest.newest("cloud").id} == {"cloud-v3"}
        photo = Image.open(io.BytesIO(sample_photos["chelsea"])).convert("RGB")
        cropped = photo.crop((20, 10, photo.width - 20, photo.height - 10))
        vector = edge.encode_images([cropped])[0]
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
        hits = client.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": edge_id, "k": 3})
        assert hits.status_code == 200, hits.text
        ids = {a["id"]: name for a, name in zip(added, sample_photos, strict=True)}
        assert ids[hits.json()["hits"][0]["id"]] == "chelsea"
