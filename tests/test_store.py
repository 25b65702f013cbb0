"""Gallery store: catalogue, dedupe, deletes, settings, filtered and paged search (recovery and concurrent use:
test_store_recovery)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import AddResult, GalleryStore, IndexSpec, NewPhoto
from tests.store_helpers import DIM, KINDS, ROOT, exact, files_under, fill, hit_ids, photo, unit


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GalleryStore]:
    s = GalleryStore(tmp_path / "gallery", DIM)
    yield s
    s.close()


# ----- catalogue ---------------------------------------------------------------------------------------------

def test_add_get_bytes_vector_counts(store: GalleryStore) -> None:
    photos = [photo("a", "cloud-v1", {"album": "x"}), photo("b", "cloud-v2"), photo("c", "cloud-v2")]
    results = store.add(photos)
    assert [r.duplicate for r in results] == [False] * 3
    assert [r.model_id for r in results] == ["cloud-v1", "cloud-v2", "cloud-v2"]
    assert len({r.id for r in results}) == 3
    record = store.get(results[0].id)
    assert record is not None
    assert (record.content_hash, record.model_id, record.metadata, record.has_bytes) == \
        (photos[0].content_hash, "cloud-v1", {"album": "x"}, True)
    assert abs(record.added_at - time.time()) < 60
    assert store.find_by_hash(photos[1].content_hash.upper()) == store.get(results[1].id)
    assert store.photo_bytes(results[2].id) == b"c"
    blob = store.folder / "photos" / photos[2].content_hash[:2] / photos[2].content_hash[2:]
    assert blob.read_bytes() == b"c"
    np.testing.assert_array_equal(store.vector(results[1].id), photos[1].vector)  # type: ignore[arg-type]
    assert store.counts() == {"cloud-v1": 1, "cloud-v2": 2}
    assert len(store) == 3
    assert store.sequence == 3
    assert store.get(999) is None and store.find_by_hash("0" * 64) is None
    assert store.photo_bytes(999) is None and store.vector(999) is None


def test_duplicates_write_nothing(store: GalleryStore) -> None:
    first = store.add([photo("a")])[0]
    files, seq = files_under(store.folder / "photos"), store.sequence
    again = store.add([photo("a", "cloud-v2", {"other": 1}), photo("b"), photo("b", "cloud-v2")])
    assert again[0] == AddResult(first.id, "cloud-v1", True)
    assert not again[1].duplicate and again[2].duplicate and again[2].id == again[1].id
    assert again[2].model_id == "cloud-v1"
    assert store.get(first.id).metadata == {"name": "a"}  # type: ignore[union-attr]
    assert len(store) == 2 and store.sequence == seq + 1
    assert len(files_under(store.folder / "photos")) == len(files) + 1


def test_keep_bytes_false_stores_no_bytes(tmp_path: Path) -> None:
    with GalleryStore(tmp_path / "g", DIM, keep_bytes=False) as store:
        result = store.add([photo("a")])[0]
        assert store.get(result.id).has_bytes is False  # type: ignore[union-attr]
        assert store.photo_bytes(result.id) is None
        assert files_under(tmp_path / "g" / "photos") == []
        assert store.search(photo("a").vector, k=1)[0].id == result.id


def test_photo_without_bytes(store: GalleryStore) -> None:
    result = store.add([photo("a", data=False)])[0]
    assert store.get(result.id).has_bytes is False  # type: ignore[union-attr]
    assert store.photo_bytes(result.id) is None


@pytest.mark.parametrize(("change", "message"), [
    ({"vector": np.ones(DIM + 1, np.float32) / np.sqrt(DIM + 1)}, "17"),
    ({"vector": np.full(DIM, np.nan, np.float32)}, "NaN"),
    ({"vector": np.ones(DIM, np.float32)}, "L2 norm 4.0"),
    ({"content_hash": "abc"}, "sha256 hex digest"),
    ({"data": b"not these bytes"}, "bytes hash to"),
    ({"metadata": {"when": {1, 2}}}, "JSON"),
    ({"metadata": ["a"]}, "JSON object"),
    ({"model_id": ""}, "model_id"),
])
def test_bad_photo_refuses_the_whole_batch(store: GalleryStore, change: dict[str, Any], message: str) -> None:
    good = photo("good")
    bad = NewPhoto(**{**photo("bad").__dict__, **change})
    with pytest.raises(ValueError, match=message):
        store.add([good, bad])
    assert len(store) == 0 and store.sequence == 0
    assert files_under(store.folder / "photos") == []


def test_bad_queries(store: GalleryStore) -> None:
    store.add([photo("a")])
    with pytest.raises(ValueError, match="16-dim"):
        store.search(np.ones(8, np.float32) / np.sqrt(8))
    with pytest.raises(ValueError, match="NaN"):
        store.search(np.full(DIM, np.nan))
    with pytest.raises(ValueError, match="L2-normalised"):
        store.search(np.ones(DIM))
    with pytest.raises(ValueError, match="k must"):
        store.search(unit(0), k=-1)
    with pytest.raises(ValueError, match="compare with"):
        store.search(unit(0), where={"a": [1]})
    with pytest.raises(ValueError, match="added_after"):
        store.search(unit(0), added_after=float("nan"))
    assert store.search(unit(0), k=0) == []


def test_delete_removes_row_vector_and_bytes(store: GalleryStore) -> None:
    a, b = store.add([photo("a"), photo("b", "cloud-v2")])
    blob = store.folder / "photos" / photo("a").content_hash[:2] / photo("a").content_hash[2:]
    assert blob.exists()
    seq = store.sequence
    assert store.delete(a.id) is True
    assert store.sequence == seq + 1
    assert store.get(a.id) is None and store.vector(a.id) is None and store.photo_bytes(a.id) is None
    assert not blob.exists()
    assert a.id not in hit_ids(store.search(photo("a").vector, k=5))
    assert store.counts() == {"cloud-v2": 1} and len(store) == 1
    assert store.delete(a.id) is False and store.delete(12345) is False
    again = store.add([photo("a")])[0]  # the same photo may come back, under a new id
    assert not again.duplicate and again.id not in (a.id, b.id)
    assert store.photo_bytes(again.id) == b"a"


def test_settings_are_durable(tmp_path: Path) -> None:
    with GalleryStore(tmp_path / "g", DIM) as store:
        assert store.get_setting("active_cloud_model") is None
        store.set_setting("active_cloud_model", "cloud-v1")
        store.set_setting("active_cloud_model", "cloud-v2")
    with GalleryStore(tmp_path / "g", DIM) as store:
        assert store.get_setting("active_cloud_model") == "cloud-v2"


def test_one_store_per_folder_and_dim_is_fixed(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g", DIM)
    with pytest.raises(RuntimeError, match="already open"):
        GalleryStore(tmp_path / "g", DIM)
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get(1)
    with pytest.raises(ValueError, match="holds 16-dim vectors"):
        GalleryStore(tmp_path / "g", 8)
    GalleryStore(tmp_path / "g", DIM).close()  # the failed open released the folder


def test_index_spec_parsing() -> None:
    spec = IndexSpec("HNSW:M=16, ef_search=128")
    assert (spec.kind, spec.get("M"), spec.get("ef_search"), spec.get("ef_construction")) == ("hnsw", 16, 128, 80)
    assert IndexSpec("ivf", {"nlist": 8}).get("train_min") == 312
    assert str(IndexSpec("ivf", {"nlist": 8})) == "ivf:nlist=8"
    for bad, message in [("annoy", "unknown index kind"), ("flat:M=3", "no parameter M"),
                         ("hnsw:M=x", "integer"), ("hnsw:M", "name=value"),
                         ("ivf:nlist=8,train_min=4", "at least nlist")]:
        with pytest.raises(ValueError, match=message):
            IndexSpec(bad)


# ----- search ------------------------------------------------------------------------------------------------
def test_search_is_exact_and_pages(store: GalleryStore) -> None:
    ids = fill(store, 200)
    for seed in range(5):
        query = unit(seed)
        hits = store.search(query, k=10)
        assert hit_ids(hits) == exact(store, ids, query, 10)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
        assert hits[0].score == pytest.approx(float(np.dot(store.vector(hits[0].id), query)), abs=1e-5)  # type: ignore[arg-type]
        pages = [store.search(query, k=7, offset=o) for o in (0, 7, 14)]
        assert [i for page in pages for i in hit_ids(page)] == exact(store, ids, query, 21)
    assert store.search(unit(0), k=5, offset=198) == store.search(unit(0), k=300)[198:]
    assert len(store.search(unit(0), k=1000)) == 200
    hit = store.search(photo("p4").vector, k=1)[0]
    assert (hit.model_id, hit.metadata) == ("cloud-v1", {"album": "even", "n": 4, "fav": False})


def test_filters_match_brute_force(tmp_path: Path) -> None:
    now = [100.0]
    with GalleryStore(tmp_path / "g", DIM, clock=lambda: now[0]) as store:
        ids = []
        for start in (0, 100, 200):
            now[0] = 100.0 + start
            ids += fill(store, 100, start)
        meta = {i: store.get(i) for i in ids}
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"models": ["cloud-v2"]}, lambda r: r.model_id == "cloud-v2"),
            ({"models": {"cloud-v1", "cloud-v2"}}, lambda r: True),
            ({"models": "cloud-v1"}, lambda r: r.model_id == "cloud-v1"),
            ({"where": {"album": "odd"}}, lambda r: r.metadata["album"] == "odd"),
            ({"where": {"album": "odd", "fav": True}}, lambda r: r.metadata["album"] == "odd" and r.metadata["fav"]),
            ({"where": {"n": 17}}, lambda r: r.metadata["n"] == 17),
            ({"added_after": 200.0}, lambda r: r.added_at >= 200),
            ({"added_before": 200.0, "models": ["cloud-v1"]}, lambda r: r.added_at < 200 and r.model_id == "cloud-v1"),
            ({"added_after": 150.0, "added_before": 250.0, "where": {"fav": False}},
             lambda r: r.added_at == 200 and not r.metadata["fav"]),
        ]
        query = unit(7)
        for kwargs, keep in cases:
            wanted = [i for i in ids if keep(meta[i])]
            for k, offset in [(10, 0), (5, 5)]:
                got = store.search(query, k=k, offset=offset, **kwargs)
                assert hit_ids(got) == exact(store, wanted, query, k + offset)[offset:], kwargs
        assert store.search(query, models=["cloud-v9"]) == []
        assert store.search(query, models=[]) == []
        assert store.search(query, where={"album": "none"}) == []


def test_where_equality_is_typed(store: GalleryStore) -> None:
    values: dict[str, Any] = {"int": 1, "float": 1.0, "true": True, "text": "1", "null": None}
    added = {name: store.add([photo(name, metadata={"x": v})])[0].id for name, v in values.items()}
    added["missing"] = store.add([photo("missing", metadata={})])[0].id
    query = unit(1)

    def found(value: Any) -> set[int]:
        return set(hit_ids(store.search(query, k=10, where={"x": value})))

    assert found(1) == {added["int"], added["float"]}
    assert found(1.0) == {added["int"], added["float"]}
    assert found(True) == {added["true"]}
    assert found(False) == set()
    assert found("1") == {added["text"]}
    assert found(None) == {added["null"], added["missing"]}


@pytest.mark.parametrize("kind", KINDS)
def test_selective_filter_scan_agrees_with_faiss_path(tmp_path: Path, kind: str) -> None:
    with GalleryStore(tmp_path / "g", DIM, IndexSpec(kind)) as store:
        ids = fill(store, 300)
        wanted = [i for i in ids if store.get(i).metadata["n"] % 50 == 7]  # type: ignore[union-attr]
        query = unit(3)
        store.scan_after = 1  # over-fetch little, then scan the matching rows exactly
        scanned = store.search(query, k=10, where={"album": "odd", "fav": False}, models=["cloud-v1"])
        only = [store.search(query, k=10, where={"n": n})[0].id for n in (7, 57, 107)]
        store.scan_after = 10**9  # over-fetch until the index is exhausted
        fetched = store.search(query, k=10, where={"album": "odd", "fav": False}, models=["cloud-v1"])
        assert only == [i for i in wanted if store.get(i).metadata["n"] in (7, 57, 107)]  # type: ignore[union-attr]
        if kind == "flat":
            assert hit_ids(scanned) == hit_ids(fetched)
        odd = [i for i in ids if (r := store.get(i)) and r.metadata["album"] == "odd" and not r.metadata["fav"]
               and r.model_id == "cloud-v1"]
        assert hit_ids(scanned) == exact(store, odd, query, 10)


def test_hnsw_and_ivf_find_each_photo(tmp_path: Path) -> None:
    for kind in KINDS[1:]:
        with GalleryStore(tmp_path / kind.split(":")[0], DIM, IndexSpec(kind)) as store:
            ids = fill(store, 120)
            for i in ids[::10]:
                assert store.search(store.vector(i), k=1)[0].id == i  # type: ignore[arg-type]


def test_ivf_trains_once_it_has_enough_vectors(tmp_path: Path) -> None:
    with GalleryStore(tmp_path / "g", DIM, IndexSpec("ivf:nlist=4,nprobe=4")) as store:
        ids = fill(store, 100)
        assert not store._index.trained  # below 39 x nlist: an exact staging index
        ids += fill(store, 100, 100)
        assert store._index.trained
        query = unit(5)
        assert hit_ids(store.search(query, k=10)) == exact(store, ids, query, 10)  # nprobe = nlist: exact
        store.delete(ids[0])
        assert store.index_ids() == store.catalogue_ids()


def test_store_does_not_import_torch() -> None:
    code = "import sys, server.store; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
