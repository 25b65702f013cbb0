"""The online backfill through the API, on both backends: every kept photo ends on the active model as if that model
had indexed it, in the order the release's scorers give, only the share asked for, beside searches, adds and
deletes; one job at a time; a stopped job resumes at the next start, and a server killed with SIGKILL mid-job
finishes it after the restart (and `concord backfill` follows it)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.manifest import BackfillScorer, Manifest
from models.release import SHIPPED_RELEASE, Release
from server.backfill import BACKFILL_KEY, plan
from server.service import Service
from server.store import GalleryStore, NewPhoto
from tests.server_helpers import (
    GALLERIES,
    WRITE,
    ServerProcess,
    add_photos,
    in_process,
    make_photo,
    server_env,
    tiny_settings,
)


def service_of(client: TestClient) -> Service:
    service: Service = client.app.state.service  # type: ignore[attr-defined]
    return service


def upgrade(client: TestClient, model_id: str = "cloud-v2") -> Any:
    return client.post("/v1/models/upgrade", json={"model_id": model_id}, headers=WRITE)


def start(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/backfill", json=body, headers=WRITE)


def wait(client: TestClient | httpx.Client, timeout: float = 120.0) -> dict[str, Any]:
    """The backfill status once the job is no longer running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get("/v1/backfill").json()
        if status["state"] != "running":
            return status
        time.sleep(0.02)
    raise AssertionError(f"the backfill did not end in {timeout} s: {status}")


def hold(service: Service, after: int) -> tuple[threading.Event, threading.Event]:
    """Let `after` batches of the backfill through, then hold each next one until `release` is set (`held` tells
    that one is held)."""
    encode: Callable[..., Any] = service.encode_stored
    held, release = threading.Event(), threading.Event()
    calls = itertools.count()

    def held_encode(*args: Any) -> Any:
        if next(calls) >= after:
            held.set()
            assert release.wait(60)
        return encode(*args)

    service.encode_stored = held_encode  # type: ignore[method-assign]
    return held, release


def named(photos: dict[str, bytes]) -> list[dict[str, str]]:
    return [{"name": n} for n in photos]


def scored_release(tiny_release: Path, folder: Path, seed: int = 7) -> tuple[Path, np.ndarray]:
    """A copy of the tiny release whose cloud-v2 carries a backfill scorer for cloud-v1 (random weights)."""
    shutil.copytree(tiny_release, folder)
    manifest = Manifest.load(folder)
    entry = manifest.model("cloud-v2")
    weights = np.random.default_rng(seed).standard_normal(entry.dim)
    scorer = BackfillScorer(tuple(float(w) for w in weights), 0.25)
    models = {**manifest.models, "cloud-v2": dataclasses.replace(entry, backfill={"cloud-v1": scorer})}
    Manifest(spaces=manifest.spaces, models=models, release="tiny-scored").save(folder)
    return folder, weights


def ranked_by_score(client: TestClient, ids: list[int], weights: np.ndarray) -> list[int]:
    """Photo ids by their stored (old) vectors' score, highest first: the order a backfill must follow."""
    store = service_of(client).store
    scores = {i: float(store.vector(i) @ weights) for i in ids}  # type: ignore[operator]
    return sorted(ids, key=lambda i: -scores[i])


def on_model(client: TestClient, ids: list[int], model: str) -> set[int]:
    return {i for i in ids if client.get(f"/v1/photos/{i}").json()["model_id"] == model}


# ----- a whole backfill ---------------------------------------------------------------------------------------

def hits_by_name(client: TestClient, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    out = []
    for query in queries:
        answer = client.post("/v1/search/embedding", json={"vector": query.tolist(), "model_id": "cloud-v2", "k": 5})
        assert answer.status_code == 200, answer.text
        out.append([(h["metadata"]["name"], round(h["score"], 4)) for h in answer.json()["hits"]])
    return out


@pytest.mark.parametrize("gallery", GALLERIES)
def test_a_backfill_leaves_the_gallery_as_if_the_active_model_had_indexed_it(tmp_path: Path, gallery: str) -> None:
    """The shipped release: a gallery indexed by cloud-v1, upgraded to cloud-v2 and backfilled, holds what a
    gallery indexed by cloud-v2 holds: the same vectors and the same answers; ids, hashes, metadata, times kept."""
    photos = {f"p{i}.jpg": make_photo(i, size=64) for i in range(10)}
    queries = Release.load(SHIPPED_RELEASE).encoder("cloud-v2").encode_bytes([make_photo(900 + i) for i in range(4)])
    with in_process(tiny_settings(SHIPPED_RELEASE, tmp_path / "direct", gallery, model="cloud-v2")) as direct:
        add_photos(direct, photos, named(photos))
        expected = hits_by_name(direct, queries)
        expected_vectors = {n: service_of(direct).store.vector(p["id"])
                            for n, p in zip(photos, add_photos(direct, photos), strict=True)}
    with in_process(tiny_settings(SHIPPED_RELEASE, tmp_path / "backfilled", gallery)) as client:
        ids = {n: p["id"] for n, p in zip(photos, add_photos(client, photos, named(photos)), strict=True)}
        before = {i: client.get(f"/v1/photos/{i}").json() for i in ids.values()}
        assert upgrade(client).status_code == 200
        assert client.get("/v1/backfill").json()["state"] == "idle"
        answer = start(client)
        assert answer.status_code == 202, answer.text
        assert answer.json()["state"] == "running" and answer.json()["target_model"] == "cloud-v2"
        status = wait(client)
        assert status["state"] == "done" and status["order"] == "by id", status
        assert (status["planned"], status["total"], status["done"], status["failed"]) == (10, 10, 10, 0)
        assert status["finished_at"] >= status["started_at"] and status["rate"] > 0
        stats = client.get("/v1/stats").json()
        assert stats["vectors"] == {"cloud-v2": 10} and stats["photos"] == 10
        for i, record in before.items():
            assert client.get(f"/v1/photos/{i}").json() == {**record, "model_id": "cloud-v2"}
        for name, i in ids.items():
            np.testing.assert_allclose(service_of(client).store.vector(i), expected_vectors[name], atol=1e-5)
        assert hits_by_name(client, queries) == expected
        assert 'concord_photos_backfilled_total{model="cloud-v2"} 10.0' in client.get("/metrics").text


@pytest.mark.parametrize("gallery", GALLERIES)
def test_share_reencodes_the_part_the_scorer_ranks_highest_first(tiny_release: Path, tmp_path: Path,
                                                                 gallery: str) -> None:
    release, weights = scored_release(tiny_release, tmp_path / "release")
    photos = {f"p{i}.jpg": make_photo(i) for i in range(10)}
    with in_process(tiny_settings(release, tmp_path, gallery)) as client:
        ids = [p["id"] for p in add_photos(client, photos)]
        order = ranked_by_score(client, ids, weights)
        assert upgrade(client).status_code == 200
        for share in (0, -0.5, 1.5, "half", None):
            refused = start(client, share=share)
            assert refused.status_code == 422 and "share" in refused.text, refused.text
        assert client.post("/v1/backfill", json={"share": 0.5}).status_code == 401
        assert start(client, share=0.5).status_code == 202
        status = wait(client)
        assert (status["state"], status["order"], status["planned"], status["total"]) == ("done", "scorer", 10, 5)
        assert on_model(client, ids, "cloud-v2") == set(order[:5]), "not the five the scorer ranks highest"
        assert client.get("/v1/stats").json()["vectors"] == {"cloud-v1": 5, "cloud-v2": 5}
        assert client.post("/v1/backfill", headers=WRITE).status_code == 202  # no body: share 1, the rest
        status = wait(client)
        assert (status["planned"], status["total"], status["done"]) == (5, 5, 5)
        assert client.get("/v1/stats").json()["vectors"] == {"cloud-v2": 10}


def test_the_order_merges_scored_models_by_score_then_the_rest_oldest_model_first(tiny_release: Path,
                                                                                   tmp_path: Path) -> None:
    manifest = Manifest.load(tiny_release)
    base = manifest.model("cloud-v1")
    rng = np.random.default_rng(3)
    scorers = {m: BackfillScorer(tuple(rng.standard_normal(base.dim).tolist()), 0.0) for m in ("cloud-b", "cloud-c")}
    entries = {m: dataclasses.replace(base, id=m, version=v)
               for v, m in enumerate(("cloud-a", "cloud-b", "cloud-c"), 1)}
    entries["cloud-t"] = dataclasses.replace(base, id="cloud-t", version=4, backfill=scorers)
    manifest = Manifest(spaces=manifest.spaces, models=entries)
    models = ["cloud-c", "cloud-a", "cloud-t", "cloud-b", "legacy"] * 6
    no_bytes = 8  # a cloud-b photo
    with GalleryStore(tmp_path / "g", base.dim) as store:
        vectors = rng.standard_normal((len(models), base.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        stored = [NewPhoto(hashlib.sha256(b"%d" % i).hexdigest(), v, m, {}, b"%d" % i if i != no_bytes else None)
                  for i, (v, m) in enumerate(zip(vectors, models, strict=True))]
        ids = [r.id for r in store.add(stored)]
        found = plan(store, manifest, "cloud-t")
    assert found.no_bytes == 1 and found.scored
    scored = [(-float(scorers[m].score(vectors[[i]])[0]), ids[i]) for i, m in enumerate(models)
              if m in scorers and i != no_bytes]
    rest = [ids[i] for m in ("cloud-a", "legacy") for i, n in enumerate(models) if n == m]
    assert [item.photo_id for item in found.items] == [i for _, i in sorted(scored)] + rest


# ----- beside other requests, one at a time -------------------------------------------------------------------

class Traffic:
    """A thread that keeps adding photos (recording what was acknowledged) and searching, until stopped."""

    def __init__(self, client: TestClient) -> None:
        self.client, self.acked, self.searches = client, {}, 0
        self.stop, self.acking = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for seed in itertools.count(5000):
            if self.stop.is_set():
                return
            added = add_photos(self.client, {f"t{seed}.jpg": make_photo(seed)})[0]
            assert added["model_id"] == "cloud-v2"
            self.acked[added["id"]] = make_photo(seed)
            self.acking.set()
            answer = self.client.post("/v1/search/photo", files={"file": ("q.jpg", make_photo(seed), "image/jpeg")})
            assert answer.status_code == 200 and answer.json()["hits"][0]["id"] == added["id"], answer.text
            self.searches += 1

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.mark.parametrize("gallery", GALLERIES)
def test_a_backfill_beside_searches_adds_and_deletes_loses_nothing(tiny_release: Path, tmp_path: Path,
                                                                  gallery: str) -> None:
    photos = {f"p{i}.jpg": make_photo(i) for i in range(12)}
    with in_process(tiny_settings(tiny_release, tmp_path, gallery, backfill_batch=2)) as client:
        ids = [p["id"] for p in add_photos(client, photos)]
        assert upgrade(client).status_code == 200
        held, release = hold(service_of(client), after=1)
        assert start(client).status_code == 202
        assert held.wait(30)
        status = client.get("/v1/backfill").json()
        assert status["state"] == "running" and status["done"] == 2 and status["total"] == 12
        second = start(client)
        assert second.status_code == 409 and "is running" in second.json()["detail"]
        refused = upgrade(client)
        assert refused.status_code == 409 and "backfill" in refused.json()["detail"]
        gone = [ids[3], ids[10]]  # one in the batch held (bytes read already), one not reached yet
        for i in gone:
            assert client.delete(f"/v1/photos/{i}", headers=WRITE).status_code == 204
        traffic = Traffic(client)
        assert traffic.acking.wait(30)  # an add went in while the job runs
        release.set()
        status = wait(client)
        traffic.join()
        assert status["state"] == "done" and (status["done"], status["skipped_gone"]) == (10, 2), status
        assert traffic.acked and traffic.searches
        kept = [i for i in ids if i not in gone]
        stats = client.get("/v1/stats").json()
        assert stats["photos"] == len(kept) + len(traffic.acked) and set(stats["vectors"]) == {"cloud-v2"}
        assert all(client.get(f"/v1/photos/{i}").status_code == 404 for i in gone), "a deleted photo came back"
        encoder = Release.load(tiny_release).encoder("cloud-v2")
        everything = {**{i: photos[f"p{ids.index(i)}.jpg"] for i in kept}, **traffic.acked}
        for photo_id, vector in zip(everything, encoder.encode_bytes(list(everything.values())), strict=True):
            hit = client.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "cloud-v2",
                                                            "k": 1}).json()["hits"][0]
            assert hit["id"] == photo_id and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_photos_without_bytes_are_skipped_and_undecodable_ones_counted(tiny_release: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_release, tmp_path)
    with in_process(settings.replace(keep_bytes=False)) as client:
        add_photos(client, {"a.jpg": make_photo(1), "b.jpg": make_photo(2)})
    with in_process(settings) as client:
        ids = [p["id"] for p in add_photos(client, {"c.jpg": make_photo(3), "d.jpg": make_photo(4)})]
        garbage = b"\xff\xd8\xff\xe0 not really a JPEG"
        vector = service_of(client).store.vector(ids[0])
        broken = service_of(client).store.add([NewPhoto(hashlib.sha256(garbage).hexdigest(), vector, "cloud-v1",
                                                        {}, garbage)])[0].id
        assert upgrade(client).status_code == 200
        assert start(client).status_code == 202
        status = wait(client)
        assert status["state"] == "done", status
        assert (status["planned"], status["done"], status["skipped_no_bytes"]) == (3, 2, 2)
        assert status["failed"] == 1 and status["failed_ids"] == [broken]
        assert client.get("/v1/stats").json()["vectors"] == {"cloud-v1": 3, "cloud-v2": 2}


# ----- resuming -----------------------------------------------------------------------------------------------

def test_a_stopped_backfill_resumes_at_the_next_start_and_keeps_its_share(tiny_release: Path,
                                                                          tmp_path: Path) -> None:
    release, weights = scored_release(tiny_release, tmp_path / "release")
    settings = tiny_settings(release, tmp_path, backfill_batch=2)
    photos = {f"p{i}.jpg": make_photo(i) for i in range(10)}
    with in_process(settings) as client:
        ids = [p["id"] for p in add_photos(client, photos)]
        order = ranked_by_score(client, ids, weights)
        assert upgrade(client).status_code == 200
        service = service_of(client)
        held, release_batch = hold(service, after=1)
        assert start(client, share=0.5).status_code == 202
        assert held.wait(30)
        service.backfill.stop()  # as a shutdown does: the batch under way ends, no other starts
        release_batch.set()
        status = wait(client)
        assert (status["state"], status["done"], status["total"]) == ("interrupted", 4, 5), status
    with in_process(settings) as client:
        status = wait(client)
        assert (status["state"], status["resumed"], status["total"], status["done"]) == ("done", 1, 5, 5), status
        assert on_model(client, ids, "cloud-v2") == set(order[:5])
    with in_process(settings) as client:  # an ended job is shown as it ended, and not run again
        assert client.get("/v1/backfill").json()["state"] == "done"
        assert client.get("/v1/stats").json()["vectors"] == {"cloud-v1": 5, "cloud-v2": 5}


def test_an_unfinished_job_for_another_model_is_shown_interrupted_not_run(tiny_release: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_release, tmp_path)
    with in_process(settings) as client:
        add_photos(client, {"a.jpg": make_photo(1)})
        job = {"state": "running", "target_model": "cloud-v2", "share": 1.0, "total": 1, "cutoff": [1, 0.0, 1]}
        service_of(client).store.set_setting(BACKFILL_KEY, json.dumps(job))  # as another server left it
    with in_process(settings) as client:  # this gallery's active model is cloud-v1
        status = client.get("/v1/backfill").json()
        assert status["state"] == "interrupted" and "active model is now cloud-v1" in status["message"], status
        assert client.get("/v1/stats").json()["vectors"] == {"cloud-v1": 1}


def concord_backfill(url: str, *args: str, key: str = WRITE["X-API-Key"]) -> subprocess.CompletedProcess[str]:
    """`concord backfill` (the server CLI's command) against `url`."""
    command = [sys.executable, "-c", "from server.cli import app; app(prog_name='concord')", "backfill", "--server",
               url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**server_env(), "CONCORD_API_KEY": key})


def test_sigkill_mid_backfill_then_a_restart_finishes_it(tiny_release: Path, tmp_path: Path) -> None:
    """A real server process, one photo per batch, killed with SIGKILL mid-job: the restart resumes the job, every
    photo ends on cloud-v2 with nothing lost, and `concord backfill` follows it and shows its status."""
    count = 300
    photos = [make_photo(seed, size=32) for seed in range(count)]
    server = ServerProcess(tiny_release, tmp_path / "data")
    server.env["CONCORD_BACKFILL_BATCH"] = "1"
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=WRITE, timeout=60) as http:
            for first in range(0, count, 50):
                files = [("files", (f"p{i}.jpg", photos[i], "image/jpeg")) for i in range(first, first + 50)]
                assert http.post("/v1/photos", files=files).status_code == 200
            assert http.post("/v1/models/upgrade", json={"model_id": "cloud-v2"}).status_code == 200
            assert http.post("/v1/backfill", json={}).status_code == 202
            while (status := http.get("/v1/backfill").json())["done"] < 20:
                time.sleep(0.005)
            server.kill()
        assert status["state"] == "running" and status["done"] < count - 50, "the kill came too late"
        server.start()
        with httpx.Client(base_url=server.url, headers=WRITE, timeout=60) as http:
            resumed = http.get("/v1/backfill").json()
            assert resumed["resumed"] == 1 and resumed["total"] == count, resumed
            cli = concord_backfill(server.url, "--interval", "0.1")
            assert cli.returncode == 0 and "backfill done" in cli.stdout, cli.stdout + cli.stderr
            assert "backfill: " in cli.stderr and "photo" in cli.stderr, cli.stderr  # tqdm's bar
            status = wait(http)
            stats = http.get("/v1/stats", params={"verify": True}).json()
            assert stats["vectors"] == {"cloud-v2": count} and stats["consistent"] is True, stats
            hashes = [hashlib.sha256(p).hexdigest() for p in photos]
            found = http.post("/v1/photos/lookup", json={"hashes": hashes}).json()["found"]
            assert len(found) == count, "a photo was lost"
            vectors = Release.load(tiny_release).encoder("cloud-v2").encode_bytes(photos[::10])
            for h, vector in zip(hashes[::10], vectors, strict=True):
                hit = http.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "cloud-v2",
                                                              "k": 1}).json()["hits"][0]
                assert hit["id"] == found[h] and hit["model_id"] == "cloud-v2"
        shown = concord_backfill(server.url, "--status")
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "done"
        bad = concord_backfill(server.url, "--share", "0")
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "share" in bad.stderr, bad.stderr
        wrong = concord_backfill(server.url, key="wrong")
        assert wrong.returncode == 1 and "403" in wrong.stderr, wrong.stderr
    finally:
        server.stop()
