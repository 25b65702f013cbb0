"""Periodic index snapshots: a store killed after many ingests replays only the changes since its last snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.store import GalleryStore

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
WRITER = """
import os, signal, sys
import numpy as np
from server.store import GalleryStore, NewPhoto
folder, every, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = GalleryStore(folder, {dim}, snapshot_every=every)
rng = np.random.default_rng(0)
for first in range(0, count, 5):
    batch = []
    for i in range(first, min(count, first + 5)):
        v = rng.standard_normal({dim}).astype(np.float32)
        batch.append(NewPhoto(f"{{i:064x}}", v / np.linalg.norm(v), "cloud", {{"n": i}}))
    store.add(batch)
store.wait_for_snapshot()
os.kill(os.getpid(), signal.SIGKILL)  # no shutdown code runs: the last snapshot is the periodic one
"""


def killed_after(folder: Path, every: int, count: int) -> None:
    """Ingest `count` photos in a child process with `snapshot_every=every`, which then dies by SIGKILL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WRITER.format(dim=DIM), str(folder), str(every), str(count)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -9, done.stderr


@pytest.mark.parametrize(("every", "most_replayed"), [(20, 20), (0, 100)])
def test_a_crash_replays_only_what_the_last_snapshot_lacks(tmp_path: Path, every: int, most_replayed: int) -> None:
    killed_after(tmp_path / "g", every, 100)
    with GalleryStore(tmp_path / "g", DIM) as store:
        assert len(store) == 100 and store.index_ids() == store.catalogue_ids()
        assert store.recovery.replayed <= most_replayed  # a snapshot may hold all 100 (then nothing is replayed)
        if every == 0:
            assert store.recovery.replayed == 100  # no snapshot since the one written when the store was made
