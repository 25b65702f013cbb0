"""Upgrade cost: making a new cloud model active on galleries of growing size, against a full backfill.

An upgrade runs the compatibility gate, loads (and sha256-checks) the new model's file and records the new
active model; it touches no stored vector. It is timed twice per gallery size: once through
`POST /v1/models/upgrade` on a real server over the store, and `repeats` times through the service function
the route calls (`Service.upgrade`), each time with a fresh release object so loading the model is paid
every time. A backfill would re-encode every stored photo: its time is the gallery size divided by the new
model's photos/s measured on real photos with decoding.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.report import latency_ms
from server.bench.driver import Server


def cloud_pair(release: Any) -> tuple[str, str]:
    """(old, new): the cloud models of the lowest and the highest version."""
    clouds = release.manifest.of_role("cloud")
    if len(clouds) < 2:
        raise ValueError(f"an upgrade needs two cloud models; release holds {[e.id for e in clouds]}")
    return clouds[0].id, clouds[-1].id


def upgrade_on(server: Server, new: str) -> dict[str, Any]:
    """One `POST /v1/models/upgrade` on a running server: its answer, the client's wall time, vectors before/after."""
    before = server.client.stats()
    start = time.perf_counter()
    answer = server.client.upgrade(new)
    wall = time.perf_counter() - start
    after = server.client.stats()
    return {"http_wall_s": wall, "server_seconds": answer.get("seconds"), "reencoded": answer.get("reencoded"),
            "changed": answer.get("changed"), "previous": answer.get("previous"),
            "active_model": answer.get("active_model"), "vectors_before": before.get("vectors"),
            "vectors_after": after.get("vectors"), "server_start_s": server.start_s}


def upgrade_over_http(release_folder: Path, data_dir: Path, new: str, log: Path) -> dict[str, Any]:
    """Start a real server on the store, upgrade it once over HTTP, stop it."""
    with Server(release_folder, data_dir, log) as server:
        return upgrade_on(server, new)


def upgrade_service(release_folder: Path, data_dir: Path, old: str, new: str, repeats: int) -> dict[str, Any]:
    """`Service.upgrade(new)` from `old`, `repeats` times (after one untimed) on the same store, each with a fresh
    release object.

    The store is left with `old` active again, so it can serve the next measurement.
    """
    from models.manifest import Manifest
    from models.release import Release
    from server.service import Service
    from server.settings import ACTIVE_MODEL_KEY
    from server.store import GalleryStore

    manifest = Manifest.load(release_folder)
    dim = manifest.model(old).dim
    times = []
    store = GalleryStore(data_dir / "gallery", dim=dim, keep_bytes=False)
    try:
        vectors = store.counts()
        for run in range(repeats + 1):  # run 0 warms up (first imports and file reads), untimed
            store.set_setting(ACTIVE_MODEL_KEY, old)  # a service follows its gallery's active model
            service = Service(Release(release_folder, manifest), store, old)
            start = time.perf_counter_ns()
            answer = service.upgrade(new)
            if run:
                times.append(time.perf_counter_ns() - start)
            if not answer["changed"] or answer["reencoded"]:
                raise RuntimeError(f"upgrade {old} -> {new} did not behave as an upgrade: {answer}")
        untouched = store.counts() == vectors
        store.set_setting(ACTIVE_MODEL_KEY, old)
    finally:
        store.close()
    return {"repeats": repeats, "latency_ms": latency_ms(times), "vectors": vectors, "vectors_untouched": untouched}


def backfill_estimate(count: int, photos_per_s: float) -> float:
    """Seconds to re-encode `count` photos at `photos_per_s` (decoding included)."""
    if photos_per_s <= 0:
        raise ValueError(f"photos/s must be positive, got {photos_per_s}")
    return count / photos_per_s


def growth(sizes: list[int], seconds: list[float]) -> dict[str, float]:
    """How upgrade time changes with gallery size: largest over smallest, and the log-log slope (0: flat)."""
    slope = float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0]) if len(sizes) > 1 else 0.0
    return {"largest_over_smallest": seconds[-1] / seconds[0], "log_log_slope": slope,
            "size_ratio": sizes[-1] / sizes[0]}


def mixed_curve(evaluation: Path) -> dict[str, Any]:
    """The mixed-gallery curve (partial backfill shares) from the evaluation report, or why it is missing."""
    import json

    if not evaluation.is_file():
        return {"available": False, "reason": f"{evaluation} does not exist (run `concord benchmark` first)"}
    try:
        mixed = json.loads(evaluation.read_text()).get("mixed")
    except (OSError, ValueError) as err:
        return {"available": False, "reason": f"{evaluation}: unreadable ({err})"}
    if not mixed:
        return {"available": False, "reason": f"{evaluation} has no 'mixed' section"}
    shares = list(mixed["shares"])
    curves = []
    for curve in mixed.get("curves", []):
        metrics = {key: value for key, value in curve.items()
                   if isinstance(value, list) and len(value) == len(shares) and key != "points"}
        curves.append({"query": curve.get("query"), **metrics})
    return {"available": True, "source": str(evaluation), "old_gallery": mixed.get("old_gallery"),
            "new_gallery": mixed.get("new_gallery"), "shares": shares, "curves": curves}
