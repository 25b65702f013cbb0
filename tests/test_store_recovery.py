"""Gallery store recovery: restarts, stale/missing/corrupt snapshots, index kind changes, crash leftovers,
SIGKILLed writers, and concurrent adds and searches."""

from __future__ import annotations

import hashlib
import inspect
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import GalleryStore, IndexSpec
from server.vector_index import SnapshotError, VectorIndex, read_snapshot
from tests.store_helpers import DIM, KINDS, ROOT, files_under, fill, photo, unit, vector_for

# ----- restart and recovery ----------------------------------------------------------------------------------

def searches(store: GalleryStore) -> list[list[tuple[int, float]]]:
    return [[(h.id, round(h.score, 5)) for h in store.search(unit(s), k=8)] for s in range(6)]


@pytest.mark.parametrize("kind", KINDS)
def test_restart_gives_the_same_results(tmp_path: Path, kind: str) -> None:
    store = GalleryStore(tmp_path / "g", DIM, IndexSpec(kind))
    ids = fill(store, 150)
    for i in ids[::7]:
        store.delete(i)
    before = searches(store)
    store.close()
    with GalleryStore(tmp_path / "g", DIM, IndexSpec(kind)) as store:
        assert store.recovery.index == "loaded"
        assert searches(store) == before
        assert store.index_ids() == store.catalogue_ids()


@pytest.mark.parametrize("kind", KINDS)
def test_stale_snapshot_is_replayed(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "g"
    store = GalleryStore(folder, DIM, IndexSpec(kind))
    old = fill(store, 50)
    store.save_index()
    stale = (folder / "index.faiss").read_bytes()
    new = fill(store, 30, 50)
    for i in old[:4] + new[:2]:
        store.delete(i)
    before = searches(store)
    store.close()
    (folder / "index.faiss").write_bytes(stale)  # as if the process died right after that snapshot
    with GalleryStore(folder, DIM, IndexSpec(kind)) as store:
        assert store.recovery.index == "replayed"
        assert store.recovery.replayed == 4 + 28  # deletes of snapshot photos + rows added since
        assert store.index_ids() == store.catalogue_ids()
        assert searches(store) == before
        assert all(i not in store.index_ids() for i in old[:4] + new[:2])
    with GalleryStore(folder, DIM, IndexSpec(kind)) as store:
        assert store.recovery.index == "loaded"  # the replayed index was saved


def corrupt_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def store_id(folder: Path) -> str:
    with sqlite3.connect(folder / "catalog.sqlite") as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'store'").fetchone()[0])


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: p.unlink(), "no index snapshot"),
    (corrupt_middle, "checksum"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
    (lambda p: p.write_bytes(b"garbage"), "not a Concord index snapshot"),
    (lambda p: VectorIndex(IndexSpec("flat"), 8).snapshot(0, store_id(p.parent)).write(p), "dim 8"),
    (lambda p: VectorIndex(IndexSpec("flat"), DIM).snapshot(0, "another-store").write(p), "store"),
    (lambda p: VectorIndex(IndexSpec("flat"), DIM).snapshot(10**6, store_id(p.parent)).write(p), "beyond"),
])
def test_unusable_snapshot_is_rebuilt(tmp_path: Path, damage: Any, reason: str) -> None:
    folder = tmp_path / "g"
    with GalleryStore(folder, DIM) as store:
        ids = fill(store, 60)
        store.delete(ids[0])
        before = searches(store)
    damage(folder / "index.faiss")
    with GalleryStore(folder, DIM) as store:
        assert store.recovery.index == "rebuilt"
        assert reason in (store.recovery.reason or "")
        assert searches(store) == before
        assert store.index_ids() == store.catalogue_ids() == ids[1:]
    read_snapshot(folder / "index.faiss", IndexSpec("flat"), DIM, store_id(folder))  # rewritten whole


def test_changing_the_index_kind_rebuilds(tmp_path: Path) -> None:
    with GalleryStore(tmp_path / "g", DIM) as store:
        ids = fill(store, 60)
    with GalleryStore(tmp_path / "g", DIM, IndexSpec("hnsw")) as store:
        assert store.recovery.index == "rebuilt" and "kind" in (store.recovery.reason or "")
        assert store.index_ids() == ids
    with pytest.raises(SnapshotError, match="kind"):
        read_snapshot(tmp_path / "g" / "index.faiss", IndexSpec("flat"), DIM, store_id(tmp_path / "g"))


def test_hnsw_tombstones_survive_restart_and_get_compacted(tmp_path: Path) -> None:
    spec = IndexSpec("hnsw:M=8")
    with GalleryStore(tmp_path / "g", DIM, spec) as store:
        ids = fill(store, 80)
        for i in ids[:10]:
            store.delete(i)
        assert store._index.ntotal == 80 and store.index_ids() == ids[10:]
    with GalleryStore(tmp_path / "g", DIM, spec) as store:
        assert store.recovery.index == "loaded" and store.index_ids() == ids[10:]
        for i in ids[10:30]:
            store.delete(i)
    with GalleryStore(tmp_path / "g", DIM, spec) as store:
        assert store.recovery.index == "rebuilt" and "compacting" in (store.recovery.reason or "")
        assert store._index.ntotal == 50 and store.index_ids() == ids[30:]


def test_leftovers_of_a_crash_are_cleaned_at_open(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    with GalleryStore(folder, DIM) as store:
        kept = store.add([photo("kept")])[0]
    orphan = hashlib.sha256(b"never committed").hexdigest()
    (folder / "photos" / orphan[:2]).mkdir(exist_ok=True)
    (folder / "photos" / orphan[:2] / orphan[2:]).write_bytes(b"never committed")
    (folder / "photos" / orphan[:2] / (orphan[2:] + ".tmp")).write_bytes(b"half")
    (folder / "index.faiss.tmp").write_bytes(b"half a snapshot")
    with GalleryStore(folder, DIM) as store:
        assert (store.recovery.tmp_removed, store.recovery.orphans_removed) == (2, 1)
        assert store.photo_bytes(kept.id) == b"kept"
    assert list(folder.rglob("*.tmp")) == []
    assert [p.name for p in files_under(folder / "photos")] == [photo("kept").content_hash[2:]]


# ----- concurrency -------------------------------------------------------------------------------------------

def test_threads_add_and_search_at_once(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with GalleryStore(tmp_path / "g", DIM, IndexSpec("hnsw:M=8")) as store:
        fill(store, 20, 10_000)

        def work(worker: int) -> None:
            try:
                for batch in range(15):
                    added = store.add([photo(f"t{worker}-{batch}-{j}", metadata={"w": worker}) for j in range(2)])
                    assert store.search(photo(f"t{worker}-{batch}-0").vector, k=1)[0].id == added[0].id
                    store.search(unit(batch), k=5, where={"w": worker})
                    store.counts()
                    if batch % 5 == 4:
                        assert store.delete(added[1].id)
                        store.save_index()
            except BaseException as err:  # collected and re-raised by the test
                errors.append(err)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(store) == 20 + 4 * 15 * 2 - 4 * 3
        assert store.index_ids() == store.catalogue_ids()


# ----- crash safety ------------------------------------------------------------------------------------------

WRITER = """
import hashlib, random, sys
from pathlib import Path
import numpy as np
from server.store import GalleryStore, IndexSpec, NewPhoto
{vector_for}
folder, kind, round_, seed = sys.argv[1:]
rng = random.Random(int(seed))
store = GalleryStore(Path(folder), 16, IndexSpec(kind))
out = sys.stdout
out.write("READY\\n"); out.flush()
live, n = [], 0
while True:
    batch = []
    for _ in range(rng.randint(1, 4)):
        data = f"{{round_}}-{{n}}".encode() * 4000; n += 1  # ~20 kB: a torn write would show
        h = hashlib.sha256(data).hexdigest()
        batch.append(NewPhoto(h, vector_for(h), "cloud-v1", {{"n": n}}, data))
    results = store.add(batch)
    out.write("".join(f"A {{r.id}} {{p.content_hash}}\\n" for p, r in zip(batch, results))); out.flush()
    live += [r.id for r in results]
    if live and rng.random() < 0.3:
        victim = live.pop(rng.randrange(len(live)))
        out.write(f"d {{victim}}\\n"); out.flush()
        store.delete(victim)
        out.write(f"D {{victim}}\\n"); out.flush()
    if rng.random() < 0.15:
        store.save_index()
"""


def check_files_whole(folder: Path, kind: str) -> None:
    """After a kill: every file under its final name is complete (tmp files may remain until the next open)."""
    for path in files_under(folder / "photos"):
        if not path.name.endswith(".tmp"):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.parent.name + path.name, path
    snapshot = folder / "index.faiss"
    if snapshot.exists():
        read_snapshot(snapshot, IndexSpec(kind), DIM, store_id(folder))


@pytest.mark.parametrize(("kind", "rounds"), [("flat", 5), ("hnsw:M=8", 3), ("ivf:nlist=4,train_min=60", 3)])
def test_sigkilled_writer_loses_nothing_acknowledged(tmp_path: Path, kind: str, rounds: int) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(vector_for=textwrap.dedent(inspect.getsource(vector_for))))
    folder = tmp_path / "g"
    rng = random.Random(1234)
    added: dict[int, str] = {}
    deleting: set[int] = set()
    deleted: set[int] = set()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for r in range(rounds):
        log = tmp_path / f"round{r}.log"
        with open(log, "w") as out:
            args = [sys.executable, str(script), str(folder), kind, str(r), str(rng.randrange(10**6))]
            child = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, cwd=ROOT, env=env)
            deadline = time.monotonic() + 60
            while "READY" not in log.read_text():
                assert child.poll() is None, child.stderr.read().decode()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the writer did not start"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stderr.close()  # type: ignore[union-attr]
        lines = [line.split() for line in log.read_text().splitlines(keepends=True) if line.endswith("\n")]
        for fields in lines:
            if fields[0] == "A":
                added[int(fields[1])] = fields[2]
            elif fields[0] == "d":
                deleting.add(int(fields[1]))
            elif fields[0] == "D":
                deleted.add(int(fields[1]))
        check_files_whole(folder, kind)
    assert len(added) >= rounds, "the writers acknowledged too little for the test to mean anything"
    with GalleryStore(folder, DIM, IndexSpec(kind)) as store:
        for photo_id, content_hash in added.items():
            record = store.get(photo_id)
            if photo_id in deleted:
                assert record is None, f"photo {photo_id}: its delete was acknowledged"
            elif photo_id not in deleting:
                assert record is not None, f"photo {photo_id}: its add was acknowledged, then lost"
                assert record.content_hash == content_hash
                np.testing.assert_array_equal(store.vector(photo_id), vector_for(content_hash))  # type: ignore[arg-type]
                assert store.photo_bytes(photo_id) is not None
        ids = store.catalogue_ids()
        assert store.index_ids() == ids
        assert set(added) - deleting <= set(ids)
        for photo_id in ids:  # acknowledged or not: each row has its bytes and its vector, searchable
            record = store.get(photo_id)
            assert hashlib.sha256(store.photo_bytes(photo_id) or b"").hexdigest() == record.content_hash  # type: ignore[union-attr]
            assert store.search(store.vector(photo_id), k=1)[0].id == photo_id  # type: ignore[arg-type]
    assert list(folder.rglob("*.tmp")) == []
