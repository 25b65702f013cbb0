"""A store shared by the worker processes of one server: what one commits, every other searches at once, and
concurrent writers leave FAISS and SQLite agreeing in every process.

A flock belongs to an open file, so two stores opened in one process contend exactly as two processes do.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from server.store import GalleryStore
from server.store.records import Replacement
from server.vector_index import IndexSpec
from tests.store_helpers import DIM, KINDS, fill, hit_ids, photo, unit


def shared_pair(folder: Path, kind: str = "flat") -> tuple[GalleryStore, GalleryStore]:
    """Two workers' stores over one folder, after the exclusive open that `concord serve --workers` makes first."""
    GalleryStore(folder, dim=DIM, index=IndexSpec(kind)).close()
    return (GalleryStore(folder, dim=DIM, index=IndexSpec(kind), shared=True),
            GalleryStore(folder, dim=DIM, index=IndexSpec(kind), shared=True))


@pytest.mark.parametrize("kind", KINDS)
def test_every_write_of_one_worker_is_searched_by_the_other_at_once(tmp_path: Path, kind: str) -> None:
    a, b = shared_pair(tmp_path / "store", kind)
    with a, b:
        ids = fill(a, 60)
        assert b.counts() == a.counts() == {"cloud-v1": 40, "cloud-v2": 20}
        assert len(b) == 60 and b.index_ids() == sorted(ids)
        target = a.vector(ids[7])
        assert target is not None
        assert hit_ids(b.search(target, k=1)) == [ids[7]]

        assert b.delete(ids[7])
        assert ids[7] not in hit_ids(a.search(target, k=5))
        assert a.counts()["cloud-v1"] + a.counts()["cloud-v2"] == 59

        moved = unit(99)
        assert a.replace_vectors("cloud-v3", [Replacement(ids[8], moved, "cloud-v1")]) == [ids[8]]
        best = b.search(moved, k=1)[0]
        assert (best.id, best.model_id) == (ids[8], "cloud-v3")
        assert b.counts()["cloud-v3"] == 1
        assert b.replace_vectors("cloud-v3", [Replacement(ids[8], unit(5), "cloud-v1")]) == []  # not twice

        a.set_setting("active_cloud_model", "cloud-v3")
        assert b.get_setting("active_cloud_model") == "cloud-v3"
        assert a.catalogue_ids() == a.index_ids() == b.index_ids()


def test_a_photo_added_by_two_workers_at_once_is_stored_once(tmp_path: Path) -> None:
    a, b = shared_pair(tmp_path / "store")
    with a, b:
        first = a.add([photo("same")])[0]
        again = b.add([photo("same")])[0]
        assert again.duplicate and again.id == first.id
        assert len(a) == len(b) == 1


def test_concurrent_writers_and_searchers_leave_every_worker_agreeing(tmp_path: Path) -> None:
    a, b = shared_pair(tmp_path / "store", "hnsw:M=8,ef_search=64")
    errors: list[BaseException] = []
    done = threading.Event()

    def write(store: GalleryStore, start: int) -> None:
        try:
            for i in range(start, start + 120, 4):
                added = [r.id for r in store.add([photo(f"w{j}", data=j % 2 == 0) for j in range(i, i + 4)])]
                if i % 20 == 0:
                    store.delete(added[0])
        except BaseException as err:
            errors.append(err)

    def search(store: GalleryStore) -> None:
        rng = np.random.default_rng(0)
        while not done.is_set():
            query = rng.standard_normal(DIM).astype(np.float32)
            store.search(query / np.linalg.norm(query), k=5)

    with a, b:
        writers = [threading.Thread(target=write, args=(a, 0)), threading.Thread(target=write, args=(b, 1000))]
        searchers = [threading.Thread(target=search, args=(s,)) for s in (a, b)]
        for t in writers + searchers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in searchers:
            t.join()
        assert not errors
        stored = a.catalogue_ids()
        assert len(stored) == 240 - 12
        assert a.index_ids() == b.index_ids() == stored
        assert a.counts() == b.counts() == {"cloud-v1": 228}
    with GalleryStore(tmp_path / "store", dim=DIM, index=IndexSpec("hnsw:M=8,ef_search=64")) as reopened:
        assert reopened.index_ids() == stored and reopened.recovery.orphans_removed == 0


def test_a_shared_store_and_an_exclusive_one_exclude_each_other(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    with GalleryStore(folder, dim=DIM), pytest.raises(RuntimeError, match="already open"):
        GalleryStore(folder, dim=DIM, shared=True)
    with GalleryStore(folder, dim=DIM, shared=True), pytest.raises(RuntimeError, match="already open"):
        GalleryStore(folder, dim=DIM)


def test_counts_survive_a_store_made_before_they_were_kept_by_sqlite(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    with GalleryStore(folder, dim=DIM) as store:
        fill(store, 9)
    import sqlite3

    with sqlite3.connect(folder / "catalog.sqlite") as conn:  # as an older Concord left it: no tallies
        for trigger in ("tally_add", "tally_delete", "tally_move"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DELETE FROM model_counts")
        conn.execute("DELETE FROM meta WHERE key = 'tallied'")
    with GalleryStore(folder, dim=DIM, shared=True) as store:
        assert store.counts() == {"cloud-v1": 6, "cloud-v2": 3}
