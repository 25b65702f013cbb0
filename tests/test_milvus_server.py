"""Several API processes on one Milvus standalone server: a photo added through one is found through the other,
and an upgrade through one is followed by the other."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx

from models.release import Release
from server.service import ACTIVE_REFRESH_S
from tests.server_helpers import WRITE, ServerProcess, make_photo


def test_two_servers_serve_one_collection(tiny_release: Path, tmp_path: Path, milvus_server: Any) -> None:
    gallery = f"milvus://{milvus_server.address}/shared"
    data = tmp_path / "data"  # the photos folder both share (on shared storage in a deployment)
    photo = make_photo(4242)
    digest = hashlib.sha256(photo).hexdigest()
    vector = Release.load(tiny_release).encoder("cloud-v1").encode_bytes([photo])[0].tolist()
    with ServerProcess(tiny_release, data, gallery=gallery) as one, \
            ServerProcess(tiny_release, data, gallery=gallery) as two, \
            httpx.Client(base_url=one.url, headers=WRITE, timeout=60) as a, \
            httpx.Client(base_url=two.url, headers=WRITE, timeout=60) as b:
        added = a.post("/v1/photos", files=[("files", ("p.jpg", photo, "image/jpeg"))],
                       data={"metadata": '{"album": "trip"}'})
        assert added.status_code == 200, added.text
        photo_id = added.json()["photos"][0]["id"]

        hits = b.post("/v1/search/embedding", json={"vector": vector, "model_id": "cloud-v1", "k": 1,
                                                    "where": {"album": "trip"}}).json()["hits"]
        assert [h["id"] for h in hits] == [photo_id] and abs(hits[0]["score"] - 1.0) < 1e-3
        assert b.post("/v1/photos/lookup", json={"hashes": [digest]}).json()["found"] == {digest: photo_id}
        assert b.get(f"/v1/photos/{photo_id}/image").content == photo
        again = b.post("/v1/photos", files=[("files", ("same.jpg", photo, "image/jpeg"))]).json()["photos"][0]
        assert again == {**again, "id": photo_id, "duplicate": True}
        assert a.get("/v1/stats").json()["photos"] == b.get("/v1/stats").json()["photos"] == 1

        assert b.delete(f"/v1/photos/{photo_id}").status_code == 204
        assert a.get(f"/v1/photos/{photo_id}").status_code == 404
        assert a.post("/v1/search/embedding", json={"vector": vector, "model_id": "cloud-v1"}).json()["hits"] == []

        assert a.post("/v1/models/upgrade", json={"model_id": "cloud-v2"}).json()["active_model"] == "cloud-v2"
        time.sleep(ACTIVE_REFRESH_S + 0.2)
        assert b.get("/v1/models").json()["active_model"] == "cloud-v2"
        later = b.post("/v1/photos", files=[("files", ("new.jpg", make_photo(4343), "image/jpeg"))])
        assert later.json()["photos"][0]["model_id"] == "cloud-v2", "the other server indexes with the new model"
        assert b.get("/v1/stats").json()["active_model"] == a.get("/v1/stats").json()["active_model"] == "cloud-v2"
