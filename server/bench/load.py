"""`concord bench load`: requests per second, p50 and p99 of embedding and photo search at 1, 8 and 32 concurrent
clients on loopback, for the server on every core (one worker process per core over one store) and the same
server pinned to one core (taskset), in one run; then the crash-recovery time of a store after 10,000 ingests with
and without periodic index snapshots.

The gallery is filled through the store's own add path with seeded unit vectors of the release's dim (what
the search costs does not depend on what the photos show); the photo query is a seeded 640x480 JPEG. The load
comes from one asyncio process sending prebuilt HTTP/1.1 requests over keep-alive connections, so the client
costs little of the cores it shares with the server. Bounded: each point runs a fixed number of seconds.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.benchmark.report import header, shown_path, write_json
from models.manifest import Manifest
from models.release import resolve_release
from server.bench.driver import Server
from server.opening import start_gallery

DEFAULT_OUT = Path("reports/bench")
CLIENTS = (1, 8, 32)
KINDS = ("embedding", "photo")
INDEXES = ("flat", "hnsw:M=16,ef_search=128")


@dataclass(frozen=True)
class LoadPlan:
    """Sizes and durations of one load run."""

    gallery: int = 2000
    seconds: float = 6.0
    warmup: float = 1.0
    ingests: int = 10_000
    snapshot_every: int = 1000
    batch: int = 16


QUICK = LoadPlan(gallery=300, seconds=1.5, warmup=0.3, ingests=1000, snapshot_every=200)


@dataclass
class Point:
    """One measured point: a server setting, a kind of search, a client count."""

    server: str
    kind: str
    clients: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Seeded unit vectors, float32 [count, dim]."""
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_gallery(folder: Path, manifest: Manifest, count: int, batch: int = 500) -> str:
    """A store of `count` photos of the newest cloud model, as `concord serve` would open it; returns that model."""
    from server.store import GalleryStore, NewPhoto

    cloud = manifest.newest("cloud")
    vectors = unit_vectors(count, cloud.dim, seed=1)
    with GalleryStore(folder / "gallery", dim=cloud.dim) as store:
        start_gallery(store, cloud.space, cloud.id)
        for first in range(0, count, batch):
            store.add([NewPhoto(f"{i:064x}", vectors[i], cloud.id, {"n": i, "album": f"a{i % 10}"})
                       for i in range(first, min(count, first + batch))])
    return cloud.id


def query_photo(seed: int = 3) -> bytes:
    """A seeded 640x480 JPEG of smooth colour blocks (a photo-sized decode)."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((640, 480), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def http_request(path: str, body: bytes, content_type: str, port: int) -> bytes:
    """A prebuilt keep-alive HTTP/1.1 POST."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode("ascii") + body


def search_requests(port: int, edge_id: str, dim: int, photo: bytes) -> dict[str, bytes]:
    """The two requests of the run: an edge embedding search and a photo search, k=10."""
    vector = unit_vectors(1, dim, seed=2)[0]
    embedding = json.dumps({"vector": [float(x) for x in vector], "model_id": edge_id, "k": 10}).encode()
    boundary = "concordbenchboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n10\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    return {"embedding": http_request("/v1/search/embedding", embedding, "application/json", port),
            "photo": http_request("/v1/search/photo", form, f"multipart/form-data; boundary={boundary}", port)}


async def _client(port: int, request: bytes, stop_at: float, record_from: float, latencies: list[float],
                  errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (start := time.perf_counter()) < stop_at:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if start >= record_from:
                latencies.append(time.perf_counter() - start)
                if status_line[9:12] != b"200":
                    errors.append(int(status_line[9:12] or 0))
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float, warmup: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors: list[int] = []
    now = time.perf_counter()
    record_from, stop_at = now + warmup, now + warmup + seconds
    await asyncio.gather(*(_client(port, request, stop_at, record_from, latencies, errors) for _ in range(clients)))
    return latencies, len(errors)


def measure(server: str, kind: str, port: int, request: bytes, clients: int, plan: LoadPlan) -> Point:
    """Run `clients` concurrent keep-alive clients for plan.seconds after a warm-up; one Point."""
    latencies, errors = asyncio.run(_load(port, request, clients, plan.seconds, plan.warmup))
    ms = np.array(latencies) * 1000.0
    return Point(server, kind, clients, len(latencies), errors, plan.seconds, len(latencies) / plan.seconds,
                 float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                 float(np.percentile(ms, 99)) if len(ms) else float("nan"))


def run_servers(release: Path, work: Path, plan: LoadPlan) -> tuple[list[Point], dict[str, Any]]:
    """Every point for the server on all cores, then the same server pinned to core 0 (same store, same requests,
    one worker process per core in both)."""
    manifest = Manifest.load(release)
    cloud_id = build_gallery(work / "data", manifest, plan.gallery)
    edge = manifest.newest("edge")
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None:
        raise RuntimeError("taskset (util-linux) is needed to pin the one-core server; install it")
    settings = {"all cores": None, "one core": ["taskset", "-c", str(cores[0])]}
    points: list[Point] = []
    for name, wrapper in settings.items():
        with Server(release, work / "data", work / f"server-{name.replace(' ', '-')}.log", wrapper=wrapper,
                    workers=len(cores)) as server:
            requests = search_requests(server.port, edge.id, edge.dim, query_photo())
            for kind in KINDS:
                for clients in CLIENTS:
                    point = measure(name, kind, server.port, requests[kind], clients, plan)
                    print(f"  {name:9s} {kind:9s} {clients:2d} clients: {point.rps:7.1f} req/s  p50 "
                          f"{point.p50_ms:6.1f} ms  p99 {point.p99_ms:6.1f} ms  errors {point.errors}", flush=True)
                    points.append(point)
    return points, {"gallery": plan.gallery, "cloud_model": cloud_id, "edge_model": edge.id, "cores": len(cores),
                    "workers": len(cores)}


def _ingest_and_die(folder: Path, dim: int, plan: LoadPlan, snapshot_every: int, kind: str) -> None:
    """In a child process: ingest plan.ingests photos in batches, then die by SIGKILL (no shutdown code runs)."""
    from server.store import GalleryStore, IndexSpec, NewPhoto

    store = GalleryStore(folder, dim=dim, index=IndexSpec(kind), snapshot_every=snapshot_every)
    vectors = unit_vectors(plan.ingests, dim, seed=5)
    for first in range(0, plan.ingests, plan.batch):
        store.add([NewPhoto(f"{i:064x}", vectors[i], "cloud", {"n": i})
                   for i in range(first, min(plan.ingests, first + plan.batch))])
    store.wait_for_snapshot()
    os.kill(os.getpid(), signal.SIGKILL)


def recovery(work: Path, dim: int, plan: LoadPlan) -> list[dict[str, Any]]:
    """Seconds to reopen a store killed after plan.ingests ingests, with periodic snapshots and without, for the
    flat index and HNSW (whose adds cost more to replay)."""
    from server.store import GalleryStore, IndexSpec

    rows = []
    for kind, every in itertools.product(INDEXES, (plan.snapshot_every, 0)):
        folder = work / f"recovery-{kind.split(':')[0]}-{every}"
        code = ("import sys; from pathlib import Path; from server.bench.load import LoadPlan, _ingest_and_die; "
                f"_ingest_and_die(Path(sys.argv[1]), {dim}, LoadPlan(**{asdict(plan)!r}), {every}, {kind!r})")
        child = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if child.returncode != -signal.SIGKILL:  # a fresh interpreter: forking after FAISS's OpenMP threads hangs
            raise RuntimeError(f"the ingesting child ended with code {child.returncode}, not by SIGKILL: "
                               f"{child.stderr[-800:]}")
        start = time.perf_counter()
        with GalleryStore(folder, dim=dim, index=IndexSpec(kind)) as store:
            seconds = time.perf_counter() - start
            state, replayed, photos = store.recovery.index, store.recovery.replayed, len(store)
        rows.append({"index": kind, "snapshot_every": every, "ingests": plan.ingests, "photos": photos, "state": state,
                     "replayed": replayed, "recovery_s": seconds})
        print(f"  {kind}, snapshot every {every or 'never (only at shutdown)'}: reopened in {seconds:.3f} s, {state}, "
              f"{replayed} changes replayed", flush=True)
    return rows


def table(points: list[Point]) -> str:
    """The load table as Markdown: each kind and client count, all cores beside one core."""
    by = {(p.server, p.kind, p.clients): p for p in points}
    lines = ["| search | clients | all cores req/s | p50 ms | p99 ms | one core req/s | p50 ms | p99 ms | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        for clients in CLIENTS:
            a, o = by[("all cores", kind, clients)], by[("one core", kind, clients)]
            lines.append(f"| {kind} | {clients} | {a.rps:.0f} | {a.p50_ms:.1f} | {a.p99_ms:.1f} | {o.rps:.0f} | "
                         f"{o.p50_ms:.1f} | {o.p99_ms:.1f} | {a.rps / o.rps:.2f}x |")
    return "\n".join(lines)


def main(quick: bool = False, release: Path | None = None, out: Path | None = None, keep_work: bool = False,
         plan: LoadPlan | None = None) -> dict[str, Any]:
    """What `concord bench load` runs: the load points and the recovery figures; writes load.json and load.md."""
    plan = plan or (QUICK if quick else LoadPlan())
    release = resolve_release(release)
    out = (out or DEFAULT_OUT) / ("quick" if quick else "")
    work = Path(tempfile.mkdtemp(prefix="concord-load-"))
    print(f"concord bench load ({'quick' if quick else 'full'}): {plan.gallery:,} photos, {plan.seconds:g} s per "
          f"point; reports -> {out}", flush=True)
    try:
        points, setup = run_servers(release, work, plan)
        dim = Manifest.load(release).newest("cloud").dim
        recovered = recovery(work, dim, plan)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report = {**header(), "plan": asdict(plan), "setup": setup, "release": shown_path(release),
              "points": [asdict(p) for p in points], "recovery": recovered}
    write_json(out, "load", report)
    markdown = (f"# Load on loopback ({setup['cores']} cores, {setup['workers']} worker processes, {plan.gallery:,} "
                f"photos, {plan.seconds:g} s per point)"
                f"\n\n{table(points)}\n\n## Recovery after {plan.ingests:,} ingests and SIGKILL\n\n"
                "| index | snapshot every | state | changes replayed | reopen s |\n|---|---:|---|---:|---:|\n"
                + "\n".join(f"| {r['index']} | {r['snapshot_every'] or 'shutdown only'} | {r['state']} | "
                            f"{r['replayed']} | {r['recovery_s']:.3f} |" for r in recovered) + "\n")
    (out / "load.md").write_text(markdown)
    print(table(points))
    print(f"wrote {out / 'load.json'}, {out / 'load.md'}")
    return report
