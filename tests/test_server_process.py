"""The server as a real process (`concord serve` in a subprocess): concurrent clients, `concord index`, and
crash safety under SIGKILL during concurrent ingest."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge.client import ConcordClient
from models.release import Release
from tests.server_helpers import API_KEY, WRITE, Launcher, ServerProcess, concord_command, make_photo, server_env

CRASH_CYCLES = 20
MILVUS_CRASH_CYCLES = 6
CRASH_SEED = 20260523


def post_photos(http: httpx.Client, photos: list[bytes]) -> list[dict[str, Any]]:
    response = http.post("/v1/photos", files=[("files", (f"p{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)])
    assert response.status_code == 200, response.text
    return list(response.json()["photos"])


def test_concurrent_clients_add_search_and_upgrade_without_error(tiny_release: Path, tmp_path: Path) -> None:
    edge = Release.load(tiny_release).encoder("edge-v2")
    query = edge.encode_bytes([make_photo(5)])[0]
    added: list[int] = []
    some_added, upgraded = threading.Event(), threading.Event()

    def writer(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=WRITE, timeout=60) as http:
            for i in range(5):
                if i == 2:  # the rest go in after the upgrade, which happens while the others search
                    some_added.set()
                    assert upgraded.wait(timeout=60)
                photos = [make_photo(10_000 * worker + 10 * i + j) for j in range(3)]
                added.extend(p["id"] for p in post_photos(http, photos))

    def searcher(worker: int) -> None:
        with ConcordClient(server.url, api_key=API_KEY, timeout=60) as client, \
                httpx.Client(base_url=server.url, timeout=60) as http:
            for i in range(8):
                client.search_embedding(query, "edge-v2", k=5)
                answer = http.post("/v1/search/photo", files={"file": ("q.jpg", make_photo(i), "image/jpeg")})
                assert answer.status_code == 200, answer.text
                assert http.get("/v1/stats").status_code == 200

    def upgrader(_: int) -> None:
        assert some_added.wait(timeout=60)
        with httpx.Client(base_url=server.url, headers=WRITE, timeout=60) as http:
            answer = http.post("/v1/models/upgrade", json={"model_id": "cloud-v2"})
        upgraded.set()
        assert answer.status_code == 200 and answer.json()["reencoded"] == 0, answer.text

    with ServerProcess(tiny_release, tmp_path / "data") as server:
        with ThreadPoolExecutor(max_workers=5) as pool:
            jobs = [pool.submit(writer, 0), pool.submit(writer, 1), pool.submit(searcher, 0),
                    pool.submit(searcher, 1), pool.submit(upgrader, 0)]
            for job in jobs:
                job.result()  # re-raises any error of a worker
        stats = httpx.get(f"{server.url}/v1/stats").json()
        assert len(set(added)) == len(added) == 30
        assert stats["photos"] == stats["vectors_total"] == 30 and stats["active_model"] == "cloud-v2"
        with ConcordClient(server.url) as client:
            result = client.search_embedding(query, "edge-v2", k=100)
        assert sorted(h.id for h in result.hits) == sorted(added)
        assert result.searched_models == ["cloud-v1", "cloud-v2"]


def test_concord_index_sends_a_folder_and_a_second_run_skips_it(tiny_release: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "trip" / "day2").mkdir(parents=True)
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF", "tif": "TIFF"}
    expected = 0
    for i, (suffix, fmt) in enumerate(itertools.islice(itertools.cycle(formats.items()), 11)):
        sub = ("", "trip", "trip/day2")[i % 3]
        (folder / sub / f"photo{i}.{suffix.upper() if i == 3 else suffix}").write_bytes(make_photo(300 + i, fmt=fmt))
        expected += 1
    (folder / "trip" / "notes.txt").write_text("not a photo, and not named like one")
    (folder / "broken.jpg").write_bytes(b"this file only claims to be a JPEG")
    env = server_env()

    def index(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*concord_command(), "index", str(folder), "--server", server.url, "--batch", "4",
                               *extra], env=env, capture_output=True, text=True, timeout=120)

    with ServerProcess(tiny_release, tmp_path / "data") as server:
        with httpx.Client(base_url=server.url, headers=WRITE) as http:  # a run that was interrupted after 2 photos
            post_photos(http, [(folder / "photo0.jpg").read_bytes(), (folder / "trip" / "photo1.jpeg").read_bytes()])
        first = index()
        assert first.returncode == 2, first.stderr  # the broken file is reported, the rest indexed
        assert f"{expected + 1} photos: {expected - 2} indexed, 2 already on the server" in first.stdout
        assert "broken.jpg" in first.stderr and "not a photo" in first.stderr
        assert "indexing: 100%" in first.stderr and "photo/s" in first.stderr  # tqdm's bar: rate and ETA
        stats = httpx.get(f"{server.url}/v1/stats").json()
        assert stats["photos"] == expected
        records = httpx.get(f"{server.url}/v1/photos", params={"hash": _sha(folder / "trip" / "day2" / "photo2.png")})
        assert records.json()["photos"][0]["metadata"] == {"path": "trip/day2/photo2.png"}

        second = index("--no-progress")
        assert f"{expected + 1} photos: 0 indexed, {expected} already on the server" in second.stdout
        assert httpx.get(f"{server.url}/v1/stats").json()["photos"] == expected

        wrong = subprocess.run([*concord_command(), "index", str(folder), "--server", server.url, "--api-key", "bad"],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "CONCORD_API_KEY": ""})
        assert wrong.returncode == 1 and "403" in wrong.stderr


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- crash safety -----------------------------------------------------------------------------------------

class Ingest:
    """Threads that keep uploading new photos (2 per request) and record what the server acknowledged."""

    def __init__(self, url: str, seeds: itertools.count[int], sent: dict[str, bytes], acked: dict[str, int]) -> None:
        self.url, self.seeds, self.sent, self.acked = url, seeds, sent, acked
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.acknowledging = threading.Event()
        """Set at this run's first acknowledged upload: ingest is in full flow."""
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(3)]

    def __enter__(self) -> Ingest:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        import hashlib

        with httpx.Client(base_url=self.url, headers=WRITE, timeout=30) as http:
            while not self.stop.is_set():
                with self.lock:
                    photos = [make_photo(next(self.seeds), size=32) for _ in range(2)]
                    hashes = [hashlib.sha256(p).hexdigest() for p in photos]
                    self.sent.update(zip(hashes, photos, strict=True))
                try:
                    answer = http.post("/v1/photos", files=[("files", (f"{h[:8]}.jpg", p, "image/jpeg"))
                                                            for h, p in zip(hashes, photos, strict=True)])
                except httpx.TransportError:  # killed mid-request: not acknowledged
                    time.sleep(0.01)
                    continue
                if answer.status_code != 200:
                    self.errors.append(f"{answer.status_code}: {answer.text[:300]}")
                    return
                with self.lock:
                    for h, photo in zip(hashes, answer.json()["photos"], strict=True):
                        self.acked[h] = photo["id"]
                self.acknowledging.set()


def check_recovered(url: str, sent: dict[str, bytes], acked: dict[str, int], encoder: Any,
                    verified: set[str]) -> dict[str, int]:
    """Every acknowledged photo is there with its id; every photo present is whole: the search for its own
    vector returns it first; catalogue rows, vectors and the FAISS index agree. Returns hash -> id present."""
    with httpx.Client(base_url=url, timeout=60) as http:
        found: dict[str, int] = http.post("/v1/photos/lookup", json={"hashes": list(sent)}).json()["found"]
        lost = {h: i for h, i in acked.items() if found.get(h) != i}
        assert not lost, f"{len(lost)} acknowledged photos are missing after the crash: {list(lost.items())[:5]}"
        stats = http.get("/v1/stats", params={"verify": True}).json()
        assert stats["photos"] == len(found), "a row exists for a photo that no client sent"
        assert stats["consistent"] is True, f"FAISS and SQLite disagree: {stats}"
        assert stats["vectors_total"] == stats["photos"] == stats["index_vectors"] == stats["catalogue_rows"], stats
        todo = [h for h in found if h not in verified]
        vectors = encoder.encode_bytes([sent[h] for h in todo]) if todo else []
        for h, vector in zip(todo, vectors, strict=True):
            answer = http.post("/v1/search/embedding", json={"vector": vector.tolist(), "model_id": "cloud-v1", "k": 1})
            hits = answer.json()["hits"]
            assert hits and hits[0]["id"] == found[h], f"photo {found[h]} is not found by its own vector: {hits}"
            assert abs(hits[0]["score"] - 1.0) < 1e-3
            assert http.get(f"/v1/photos/{found[h]}/image").content == sent[h], "the kept bytes are not whole"
            verified.add(h)
    return found


@pytest.mark.parametrize("backend", ["embedded", "milvus"])
def test_sigkill_during_concurrent_ingest_loses_no_acknowledged_photo(tiny_release: Path, tmp_path: Path,
                                                                      backend: str,
                                                                      request: pytest.FixtureRequest) -> None:
    """Kill -9 the API process during ingest, over and over: every acknowledged photo is there, nothing else. On
    Milvus the engine is a standalone server that outlives the API processes (fewer cycles: each start loads the
    collection); at the end Milvus itself is killed -9 and restarted, and everything acknowledged is back."""
    gallery, cycles = "embedded", CRASH_CYCLES
    milvus = None
    if backend == "milvus":
        milvus = request.getfixturevalue("milvus_server")
        gallery, cycles = f"milvus://{milvus.address}/crash", MILVUS_CRASH_CYCLES
    rng = random.Random(CRASH_SEED)
    encoder = Release.load(tiny_release).encoder("cloud-v1")
    data, log = tmp_path / "data", tmp_path / "server.log"
    sent: dict[str, bytes] = {}
    acked: dict[str, int] = {}
    verified: set[str] = set()
    seeds = itertools.count(1)
    kills_during_requests = 0
    with Launcher(log, server_env()) as launcher:
        for _ in range(cycles):
            server = ServerProcess(tiny_release, data, launcher=launcher, gallery=gallery).start()
            try:
                check_recovered(server.url, sent, acked, encoder, verified)
                with Ingest(server.url, seeds, sent, acked) as ingest:
                    assert ingest.acknowledging.wait(timeout=60), f"no upload was acknowledged: {ingest.errors}"
                    time.sleep(rng.uniform(0.0, 0.25))
                    in_flight = len(sent) - len(acked)
                    server.kill()
                    ingest.stop.set()
                assert not ingest.errors, ingest.errors
                kills_during_requests += in_flight > 0
            finally:
                server.kill()
    assert kills_during_requests >= cycles // 2, "the kills did not land during ingest"
    if milvus is not None:
        milvus.kill()  # the engine itself crashes; a restart after kill -9 can be slow, the server retries
        milvus.start()

    server = ServerProcess(tiny_release, data, log=log, gallery=gallery).start(timeout=180)  # plain `concord serve`
    try:
        verified.clear()  # check every photo once more, after all the crashes
        found = check_recovered(server.url, sent, acked, encoder, verified)
        probes = encoder.encode_bytes([make_photo(seed, size=32) for seed in (900_001, 900_002, 900_003)])
        before = _answers(server.url, probes)
        _assert_exact_neighbours(before, probes, found, sent, encoder)
        server.kill()  # idle now: the answers must survive a crash unchanged
        server.start()
        assert _answers(server.url, probes) == before
    finally:
        server.stop()


def _answers(url: str, probes: np.ndarray) -> list[list[tuple[int, float]]]:
    with httpx.Client(base_url=url, timeout=60) as http:
        out = []
        for probe in probes:
            hits = http.post("/v1/search/embedding", json={"vector": probe.tolist(), "model_id": "cloud-v1",
                                                           "k": 10}).json()["hits"]
            out.append([(h["id"], h["score"]) for h in hits])
        return out


def _assert_exact_neighbours(answers: list[list[tuple[int, float]]], probes: np.ndarray, found: dict[str, int],
                             sent: dict[str, bytes], encoder: Any) -> None:
    """The server's top 10 equal a brute-force search over the photos the catalogue holds."""
    hashes = list(found)
    gallery = encoder.encode_bytes([sent[h] for h in hashes])
    for probe, answer in zip(probes, answers, strict=True):
        scores = gallery @ probe
        top = np.argsort(-scores)[:10]
        assert [found[hashes[i]] for i in top] == [i for i, _ in answer]
        np.testing.assert_allclose([s for _, s in answer], scores[top], atol=1e-4)
