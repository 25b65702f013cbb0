"""The Milvus gallery (on Milvus Lite, a real engine in a local file) answers as the embedded store does: the same
photos, filters, time ranges, paging, models, deletes and duplicates give the same hits; `concord migrate` moves a
store in with nothing lost and nothing re-encoded; a Milvus that cannot be reached is one plain line."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import GalleryStore, Hit, IndexSpec, NewPhoto
from server.store.backends import GalleryLocation, open_gallery
from server.store.migrate import migrate
from server.store.milvus import MilvusGallery, hash_ids
from server.store.milvus_client import MilvusUnavailable, connect
from tests.server_helpers import concord_command, free_port

DIM = 16
MODELS = ["cloud-v1", "cloud-v2"]
VALUES: list[Any] = [True, False, 1, 0, 1.5, "1", "a", None]


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def photos(n: int, start: int = 0) -> list[NewPhoto]:
    """Photos with metadata of every JSON kind a filter compares (booleans beside 1 and 0, "1" beside 1, nulls,
    missing fields), two models, bytes."""
    out = []
    for i in range(start, start + n):
        data = f"photo {i}".encode()
        metadata: dict[str, Any] = {"album": "ab"[i % 2], "i": i}
        if i % 3:
            metadata["flag"] = VALUES[i % len(VALUES)]
        out.append(NewPhoto(hashlib.sha256(data).hexdigest(), unit(i), MODELS[i % 5 == 0], metadata, data))
    return out


class Clock:
    """Timestamps one second apart (the embedded store reads the clock once more, when it is created)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[GalleryStore, MilvusGallery]]:
    """The embedded store and a Milvus Lite gallery holding the same 60 photos, added in the same batches."""
    embedded = GalleryStore(tmp_path / "embedded", DIM, clock=Clock(999_999.0))
    milvus = MilvusGallery(str(tmp_path / "lite.db"), "gallery", DIM, tmp_path / "photos", clock=Clock())
    for batch in (photos(25), photos(35, 25)):
        embedded.add(batch)
        milvus.add(batch)
    yield embedded, milvus
    embedded.close()
    milvus.close()


def by_hash(gallery: Any, hits: list[Hit]) -> list[tuple[str, float, str, dict[str, Any], float]]:
    """Hits named by content hash (the two backends give different ids), scores rounded."""
    return [(gallery.get(h.id).content_hash, round(h.score, 4), h.model_id, h.metadata, h.added_at) for h in hits]


def test_every_filter_answers_as_the_embedded_store(pair: tuple[GalleryStore, MilvusGallery]) -> None:
    embedded, milvus = pair
    queries: list[dict[str, Any]] = [{}, {"k": 5, "offset": 7}, {"k": 0}, {"k": 100}, {"models": ["cloud-v2"]},
                                     {"models": ["cloud-v1"], "k": 4, "offset": 2}, {"models": ["nope"]},
                                     {"where": {"album": "a"}}, {"where": {"album": "a", "i": 4}},
                                     {"added_after": 1_000_010.0, "added_before": 1_000_030.0, "k": 50},
                                     {"added_after": 1_000_040.0, "where": {"album": "b"}, "k": 50}]
    queries += [{"where": {"flag": value}, "k": 60} for value in VALUES]
    for q, seed in zip(queries, itertools.count(1000), strict=False):
        query = unit(seed)
        assert by_hash(milvus, milvus.search(query, **q)) == by_hash(embedded, embedded.search(query, **q)), q
    assert milvus.counts() == embedded.counts() and len(milvus) == len(embedded) == 60
    for bad in ({"k": -1}, {"offset": 1.5}, {"where": {"x": [1]}}, {"where": {"x": float("nan")}},
                {"added_after": "yesterday"}, {"k": 16_000, "offset": 1_000}):
        with pytest.raises(ValueError):
            milvus.search(unit(1), **bad)


def test_records_bytes_vectors_settings_and_deletes(pair: tuple[GalleryStore, MilvusGallery]) -> None:
    embedded, milvus = pair
    first = photos(1)[0]
    record = milvus.find_by_hash(first.content_hash)
    assert record is not None and record.id == hash_ids(first.content_hash)[0] and record.id < 2**53
    mine = embedded.find_by_hash(first.content_hash)
    assert mine is not None
    assert (record.content_hash, record.model_id, record.metadata, record.added_at, record.has_bytes) == (
        mine.content_hash, mine.model_id, mine.metadata, mine.added_at, mine.has_bytes)
    assert milvus.photo_bytes(record.id) == first.data
    np.testing.assert_array_equal(milvus.vector(record.id), first.vector)  # type: ignore[arg-type]
    assert milvus.get(123) is None and milvus.vector(123) is None and milvus.photo_bytes(123) is None

    again = milvus.add([photos(1)[0], photos(1, 60)[0], photos(1, 60)[0]])
    assert [r.duplicate for r in again] == [True, False, True] and again[1].id == again[2].id
    assert len(milvus) == 61

    assert milvus.delete(record.id) and not milvus.delete(record.id)
    assert milvus.get(record.id) is None and not milvus.blobs.path(first.content_hash).exists()
    assert record.id not in [h.id for h in milvus.search(first.vector, k=61)]
    assert milvus.catalogue_ids() == milvus.index_ids() and len(milvus.catalogue_ids()) == 60

    milvus.set_setting("active_cloud_model", "cloud-v2")
    assert milvus.get_setting("active_cloud_model") == "cloud-v2" and milvus.get_setting("nope") is None
    with pytest.raises(ValueError, match="holds NaN"):
        milvus.add([NewPhoto(first.content_hash, np.full(DIM, np.nan), "cloud-v1", {})])
    with pytest.raises(ValueError, match="the bytes hash to"):
        milvus.add([NewPhoto(first.content_hash, first.vector, "cloud-v1", {}, b"other bytes")])
    assert len(milvus) == 60


def test_reopening_keeps_everything_and_refuses_another_dim(tmp_path: Path) -> None:
    lite = str(tmp_path / "lite.db")
    with MilvusGallery(lite, "g", DIM, tmp_path / "photos") as milvus:
        added = milvus.add(photos(10))
        milvus.set_setting("k", "v")
        before = milvus.search(unit(5), k=10)
    with MilvusGallery(lite, "g", DIM, tmp_path / "photos") as milvus:
        assert milvus.search(unit(5), k=10) == before and milvus.get_setting("k") == "v"
        assert sorted(milvus.catalogue_ids()) == sorted(r.id for r in added)
    with pytest.raises(ValueError, match="holds 16-dim vectors; this release embeds into 8"):
        MilvusGallery(lite, "g", 8, tmp_path / "photos")


def test_a_taken_id_moves_to_the_next_candidate(tmp_path: Path) -> None:
    with MilvusGallery(str(tmp_path / "lite.db"), "g", DIM, tmp_path / "photos") as milvus:
        intruder, victim = photos(2)
        taken = hash_ids(victim.content_hash)[0]
        milvus.upsert_rows([{"id": taken, "vector": intruder.vector, "content_hash": intruder.content_hash,
                             "model_id": "cloud-v1", "metadata": {}, "added_at": 1.0, "has_bytes": False}])
        result = milvus.add([victim])[0]
        assert result.id == hash_ids(victim.content_hash)[1] and not result.duplicate
        assert milvus.get(taken).content_hash == intruder.content_hash  # type: ignore[union-attr]


def test_migrate_moves_every_row_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with GalleryStore(data / "gallery", DIM, clock=Clock()) as store:
        store.add(photos(40))
        store.add([NewPhoto(p.content_hash, p.vector, p.model_id, p.metadata) for p in photos(5, 40)])  # no bytes
        store.delete(store.find_by_hash(photos(1, 3)[0].content_hash).id)  # type: ignore[union-attr]
        store.set_setting("active_cloud_model", "cloud-v2")
        expected = {i: (store.get(i), store.vector(i)) for i in store.catalogue_ids()}
        query_answer = store.search(unit(77), k=10, where={"album": "a"})
    report = migrate(data, f"milvus-lite:{tmp_path / 'lite.db'}", data)
    assert report.photos == report.verified == 44 and report.lost == [] and report.bytes_files == 39
    assert "0 lost" in report.summary() and report.settings == 1

    gallery = open_gallery(GalleryLocation.parse(f"milvus-lite:{tmp_path / 'lite.db'}"), data, DIM,
                           IndexSpec("flat"), True)
    try:
        assert sorted(gallery.catalogue_ids()) == sorted(expected)
        for photo_id, (record, vector) in expected.items():
            assert gallery.get(photo_id) == record
            np.testing.assert_array_equal(gallery.vector(photo_id), vector)  # type: ignore[arg-type]
            if record is not None and record.has_bytes:
                assert gallery.photo_bytes(photo_id) == f"photo {record.metadata['i']}".encode()
        assert gallery.get_setting("active_cloud_model") == "cloud-v2"
        assert [(h.id, round(h.score, 5)) for h in gallery.search(unit(77), k=10, where={"album": "a"})] == \
            [(h.id, round(h.score, 5)) for h in query_answer]
    finally:
        gallery.close()
    again = migrate(data, f"milvus-lite:{tmp_path / 'lite.db'}", data)  # a rerun (after an interruption) is harmless
    assert again.lost == [] and again.verified == 44


def test_migrate_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="INTO Milvus"):
        migrate(tmp_path, "embedded", tmp_path)
    with pytest.raises(ValueError, match="no embedded store"):
        migrate(tmp_path, f"milvus-lite:{tmp_path / 'x.db'}", tmp_path)


def test_an_unreachable_milvus_is_one_plain_line(tmp_path: Path) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(MilvusUnavailable, match=f"cannot reach Milvus at http://127.0.0.1:{port}") as err:
        connect(f"http://127.0.0.1:{port}", timeout=2.0)
    assert "start Milvus there" in str(err.value) and time.monotonic() - start < 30
    served = subprocess.run([*concord_command(), "serve", "--data-dir", str(tmp_path), "--gallery",
                             f"milvus://127.0.0.1:{port}"], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "CONCORD_MILVUS_TIMEOUT": "2"})
    assert served.returncode == 1, served.stderr
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith(f"concord: cannot reach Milvus at http://127.0.0.1:{port}") and "--gallery" in last


def test_gallery_settings_parse_plainly() -> None:
    assert GalleryLocation.parse("") == GalleryLocation()
    milvus = GalleryLocation.parse("milvus://db.internal:19530/photos")
    assert (milvus.kind, milvus.uri, milvus.collection) == ("milvus", "http://db.internal:19530", "photos")
    lite = GalleryLocation.parse("milvus-lite:./g.db")
    assert lite.kind == "milvus-lite" and lite.uri.endswith("/g.db") and lite.collection == "concord"
    for bad, why in (("milvus://nohost", "milvus://host:port"), ("milvus-lite:./g.sqlite", "ending in .db"),
                     ("faiss", "unknown gallery"), ("milvus://h:1/bad-name", "collection name")):
        with pytest.raises(ValueError, match=why):
            GalleryLocation.parse(bad)
