"""A backfill's store side on both backends: `replace_vectors` swaps a photo's vector and model in place (id, hash,
metadata, time and bytes kept) only while the photo still holds the expected model, and `stale_pages` lists what is
left; on the embedded store a snapshot older than the swap is replayed to the new vectors (every index kind)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import GalleryStore, IndexSpec
from server.store.milvus import MilvusGallery
from server.store.records import Replacement
from server.vector_index import entry_positions
from tests.store_helpers import DIM, KINDS, photo, unit


@pytest.fixture(params=["embedded", "milvus-lite"])
def gallery(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An empty gallery of each backend."""
    if request.param == "embedded":
        store: Any = GalleryStore(tmp_path / "g", DIM)
    else:
        store = MilvusGallery(str(tmp_path / "lite.db"), "gallery", DIM, tmp_path / "photos")
    yield store
    store.close()


def swap(gallery: Any, ids: list[int], seed: int, expected: str = "cloud-v1") -> list[int]:
    """Replace the vectors of `ids` by unit(seed + id), made by cloud-v2."""
    return list(gallery.replace_vectors("cloud-v2", [Replacement(i, unit(seed + i), expected) for i in ids]))


def test_a_swap_keeps_the_photo_and_changes_only_its_vector_and_model(gallery: Any) -> None:
    ids = [r.id for r in gallery.add([photo(f"p{i}") for i in range(6)])]
    before = {i: gallery.get(i) for i in ids}
    assert sorted(swap(gallery, ids[:4], 1000)) == sorted(ids[:4])
    assert gallery.counts() == {"cloud-v1": 2, "cloud-v2": 4}
    for i in ids[:4]:
        record = gallery.get(i)
        assert record.model_id == "cloud-v2"
        assert (record.id, record.content_hash, record.metadata, record.added_at, record.has_bytes) == (
            before[i].id, before[i].content_hash, before[i].metadata, before[i].added_at, before[i].has_bytes)
        assert gallery.photo_bytes(i) == f"p{ids.index(i)}".encode()
        np.testing.assert_allclose(gallery.vector(i), unit(1000 + i), atol=1e-6)
        hit = gallery.search(unit(1000 + i), k=1)[0]
        assert hit.id == i and hit.model_id == "cloud-v2" and hit.score == pytest.approx(1.0, abs=1e-4)
    assert sorted(gallery.index_ids()) == sorted(gallery.catalogue_ids()) == sorted(ids)
    assert len(gallery) == 6


def test_a_deleted_or_already_swapped_photo_is_left_alone(gallery: Any) -> None:
    ids = [r.id for r in gallery.add([photo(f"p{i}") for i in range(4)])]
    gallery.delete(ids[0])
    assert swap(gallery, ids[:2], 1000) == [ids[1]]  # the deleted one is not brought back
    assert gallery.get(ids[0]) is None
    assert swap(gallery, ids[1:3], 2000) == [ids[2]]  # a second backfill finds ids[1] on cloud-v2 already
    np.testing.assert_allclose(gallery.vector(ids[1]), unit(1000 + ids[1]), atol=1e-6)
    assert gallery.counts() == {"cloud-v1": 1, "cloud-v2": 2}
    assert swap(gallery, [], 0) == []
    with pytest.raises(ValueError, match="L2 norm"):
        gallery.replace_vectors("cloud-v2", [Replacement(ids[3], unit(1) * 2, "cloud-v1")])
    assert gallery.get(ids[3]).model_id == "cloud-v1"


def test_stale_pages_list_every_photo_of_another_model_by_id(gallery: Any) -> None:
    added = gallery.add([photo(f"p{i}", "cloud-v1" if i % 3 else "cloud-v2", data=i != 4) for i in range(11)])
    ids = [r.id for r in added]
    pages = list(gallery.stale_pages("cloud-v2", page=3))
    assert all(len(p.ids) <= 3 for p in pages) or isinstance(gallery, MilvusGallery)
    listed = np.concatenate([p.ids for p in pages]).tolist()
    expected = [i for n, i in enumerate(ids) if n % 3]
    assert sorted(listed) == sorted(expected)
    for page in pages:
        for j, photo_id in enumerate(page.ids.tolist()):
            n = ids.index(photo_id)
            assert page.models[j] == "cloud-v1" and bool(page.has_bytes[j]) == (n != 4)
            np.testing.assert_allclose(page.vectors[j], gallery.vector(photo_id), atol=1e-6)
    swap(gallery, expected, 0)
    assert list(gallery.stale_pages("cloud-v2")) == []


def searches(store: GalleryStore) -> list[list[tuple[int, float, str]]]:
    return [[(h.id, round(h.score, 5), h.model_id) for h in store.search(unit(s), k=8)] for s in range(6)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_snapshot_older_than_the_swap_is_replayed_to_the_new_vectors(tmp_path: Path, kind: str) -> None:
    """As if the process died after the swap's commit and before any newer snapshot: the replay swaps too."""
    folder = tmp_path / "g"
    store = GalleryStore(folder, DIM, IndexSpec(kind))
    ids = [r.id for r in store.add([photo(f"p{i}", data=False) for i in range(60)])]
    swap(store, ids[:10], 500)  # before the snapshot: it holds these new vectors
    store.save_index()
    stale = (folder / "index.faiss").read_bytes()
    swap(store, ids[5:15], 1000)  # ids[5:10] are on cloud-v2 already: left alone
    store.delete(ids[12])  # swapped, then deleted
    store.delete(ids[40])  # deleted unswapped
    fresh = [r.id for r in store.add([photo(f"q{i}", data=False) for i in range(5)])]
    swap(store, fresh[:2], 2000)  # added and swapped after the snapshot
    before, counts = searches(store), store.counts()
    store.close()
    (folder / "index.faiss").write_bytes(stale)
    with GalleryStore(folder, DIM, IndexSpec(kind)) as store:
        assert store.recovery.index == "replayed", store.recovery
        assert searches(store) == before and store.counts() == counts
        assert store.index_ids() == store.catalogue_ids()
        for i in [*ids[10:12], *ids[13:15], *fresh[:2]]:
            seed = 2000 if i in fresh else 1000
            assert store.search(unit(seed + i), k=1)[0].id == i, f"photo {i} is not found by its new vector"
    with GalleryStore(folder, DIM, IndexSpec(kind)) as store:  # and a clean restart after that gives the same
        assert searches(store) == before and store.index_ids() == store.catalogue_ids()


def test_hnsw_keeps_one_live_entry_per_photo_and_compacts_at_open(tmp_path: Path) -> None:
    """HNSW cannot remove: a swapped photo's old entry is marked dead, searches skip it, and an index that is
    mostly dead entries is rebuilt at the next open."""
    kind = IndexSpec("hnsw:M=8,ef_search=64")
    store = GalleryStore(tmp_path / "g", DIM, kind)
    ids = [r.id for r in store.add([photo(f"p{i}", data=False) for i in range(40)])]
    swap(store, ids, 3000)
    hits = store.search(unit(3000 + ids[0]), k=40)
    assert sorted(h.id for h in hits) == sorted(ids) and {h.model_id for h in hits} == {"cloud-v2"}
    assert store.index_ids() == store.catalogue_ids()
    store.close()
    with GalleryStore(tmp_path / "g", DIM, kind) as store:
        assert store.recovery.index == "rebuilt" and "compacting" in str(store.recovery.reason)
        assert store.search(unit(3000 + ids[3]), k=1)[0].id == ids[3]


def test_entry_positions_finds_every_held_id_in_a_sorted_or_shuffled_id_map() -> None:
    view = np.array([3, 5, 8, 13, 21, 34], dtype=np.int64)  # a flat index: ascending ids
    asked = np.array([21, 4, 3, 34, 99], dtype=np.int64)
    assert entry_positions(view, asked).tolist() == [4, -1, 0, 5, -1]
    shuffled = np.array([8, 34, 3, 21, 13, 5], dtype=np.int64)  # a binary search alone would miss ids here
    assert entry_positions(shuffled, asked).tolist() == [3, -1, 2, 1, -1]
    assert entry_positions(np.zeros(0, np.int64), asked).tolist() == [-1] * 5
