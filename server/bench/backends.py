"""`concord bench backends`: the gallery backends side by side, through the API, at each gallery size.

Every backend gets the same vectors (the search benchmark's mixture, at the release's dim), written through its
own add path (`GalleryStore.add` / `MilvusGallery.add`: the checks, duplicate lookups and durable writes of a
real upload, without encoding photos), then a real `concord serve` on it. The searches run batch 1 through
`POST /v1/search/embedding`, interleaved across the servers so a busy moment hits every backend alike; recall@10
is against exact search over the same vectors (tie-aware). Memory is the resident size of the API process and,
for Milvus standalone, of the Milvus server's process group.

Backends (index parameters in the report):
- embedded-flat: SQLite + FAISS IndexFlatIP (exact), the default;
- embedded-hnsw: SQLite + FAISS HNSW;
- milvus-hnsw: a Milvus standalone server (PyPI `milvus` 2.3.5, started here in its own process group), HNSW;
- milvus-lite-flat: Milvus Lite (a local file), FLAT; on request only: its engine is for tests and small
  setups (at 100k vectors it ingested 448 vectors/s and took seconds per search here).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.report import interleave, latency_ms
from server.bench.milvus_server import TICK_MS

HNSW = "hnsw:M=32,ef_construction=200,ef_search=128"
VARIANTS = ("embedded-flat", "embedded-hnsw", "milvus-hnsw", "milvus-lite-flat")
BATCH = 10_000
TIE_EPS = 1e-5


@dataclass(frozen=True)
class Variant:
    """One backend under test: its `--gallery` value, `--index` value and what the index is."""

    name: str
    gallery: str
    index: str
    described: str


def variants(names: tuple[str, ...], work: Path, milvus_address: str | None) -> list[Variant]:
    """The backends to compare (Milvus standalone only when its server runs at `milvus_address`)."""
    table = {
        "embedded-flat": Variant("embedded-flat", "embedded", "flat", "FAISS IndexFlatIP (exact)"),
        "embedded-hnsw": Variant("embedded-hnsw", "embedded", HNSW, "FAISS HNSW M=32, efConstruction=200, "
                                 "efSearch=128"),
        "milvus-hnsw": Variant("milvus-hnsw", f"milvus://{milvus_address}/bench", HNSW,
                               "Milvus 2.3.5 standalone HNSW M=32, efConstruction=200, ef=128, IP, Strong"),
        "milvus-lite-flat": Variant("milvus-lite-flat", f"milvus-lite:{work / 'lite' / 'gallery.db'}/bench", "flat",
                                    "Milvus Lite FLAT (exact), IP, Strong"),
    }
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return [table[n] for n in names if n != "milvus-hnsw" or milvus_address]


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group `pgid` (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total += process_rss(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


def process_rss(pid: int) -> int:
    """Resident bytes of one process, 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k row numbers and the k-th best score per query (the tie-aware recall threshold)."""
    tops, kth = [], []
    for query in queries:
        scores = vectors @ query
        top = np.argpartition(-scores, k)[:k]
        tops.append(top[np.argsort(-scores[top])])
        kth.append(float(np.sort(scores[top])[0]))
    return np.asarray(tops), np.asarray(kth)


def fill(variant: Variant, data_dir: Path, vectors: np.ndarray, model_id: str,
         space: str) -> tuple[dict[str, Any], dict[int, int]]:
    """Write `vectors` through the backend's add path; returns the figures and photo id -> row number."""
    from server.opening import start_gallery
    from server.store import IndexSpec, NewPhoto
    from server.store.backends import GalleryLocation, open_gallery

    start = time.perf_counter()
    gallery = open_gallery(GalleryLocation.parse(variant.gallery), data_dir, vectors.shape[1],
                           IndexSpec(variant.index), keep_bytes=False)
    rows: dict[int, int] = {}
    try:
        start_gallery(gallery, space, model_id)
        opened = time.perf_counter()
        for first in range(0, len(vectors), BATCH):
            batch = range(first, min(len(vectors), first + BATCH))
            results = gallery.add([NewPhoto(hashlib.sha256(f"bench-vector-{i}".encode()).hexdigest(), vectors[i],
                                            model_id, {}) for i in batch])
            rows.update((r.id, i) for r, i in zip(results, batch, strict=True))
        written = time.perf_counter()
        ready = _index_ready(gallery)
    finally:
        gallery.close()
    done = time.perf_counter()
    return {"vectors": len(vectors), "ingest_s": written - opened, "vectors_per_s": len(vectors) / (written - opened),
            "index_ready_s": ready, "close_s": done - written - ready, "open_s": opened - start,
            "route": f"{type(gallery).__name__}.add in batches of {BATCH} (no photo bytes)"}, rows


def _index_ready(gallery: Any) -> float:
    """For Milvus: flush and wait until the vector index covers every row (seconds); 0 for the embedded store."""
    client = getattr(gallery, "_client", None)
    if client is None:
        return 0.0
    start = time.perf_counter()
    client.flush(gallery.collection)
    deadline = start + 3600
    while time.perf_counter() < deadline:
        info = client.describe_index(gallery.collection, "vector")
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= \
                int(info.get("total_rows", 0)):
            break
        time.sleep(1.0)
    return time.perf_counter() - start


def compare(release: Path, vectors: np.ndarray, queries: np.ndarray, model_id: str, k: int, chosen: list[Variant],
            work: Path, milvus_pgid: int | None) -> dict[str, Any]:
    """Fill every backend, serve each, time interleaved API searches, measure recall@k and memory."""
    from models.manifest import Manifest
    from server.bench.driver import Server

    space = Manifest.load(release).model(model_id).space
    exact, kth = exact_top(vectors, queries, k)
    filled = {}
    for variant in chosen:
        filled[variant.name] = fill(variant, work / variant.name, vectors, model_id, space)
        print(f"backends {len(vectors):,} {variant.name}: {filled[variant.name][0]['vectors_per_s']:,.0f} vectors/s "
              f"ingest", flush=True)
    servers = {v.name: Server(release, work / v.name, work / f"server-{v.name}.log", model=model_id,
                              gallery=v.gallery, index=v.index) for v in chosen}
    got: dict[str, list[list[int]]] = {name: [] for name in servers}
    started = []
    try:
        for server in servers.values():
            started.append(server.__enter__())

        def call(name: str) -> Callable[[int], None]:
            return lambda i: got[name].append(
                [hit.id for hit in servers[name].client.search_embedding(queries[i], model_id, k).hits])

        for i in range(min(5, len(queries))):  # warm-up, not timed
            for name in servers:
                call(name)(i)
        got = {name: [] for name in servers}
        times = interleave({name: call(name) for name in servers}, len(queries))
        memory = {name: process_rss(server.pid) for name, server in servers.items()}
        milvus_rss = group_rss(milvus_pgid) if milvus_pgid else 0
    finally:
        for server in started:
            server.__exit__(None, None, None)
    rows: list[dict[str, Any]] = []
    for variant in chosen:
        figures, id_rows = filled[variant.name]
        recall = _recall(got[variant.name], id_rows, exact, kth, vectors, queries, k)
        row: dict[str, Any] = {"backend": variant.name, "gallery": variant.gallery, "index": variant.index,
               "index_described": variant.described, "ingest": figures,
               "api_latency_ms": latency_ms(times[variant.name]), f"recall@{k}": recall,
               "api_rss_bytes": memory[variant.name]}
        if variant.name == "milvus-hnsw":
            row["milvus_server_rss_bytes"] = milvus_rss
        rows.append(row)
    base = next((r for r in rows if r["backend"] == "embedded-flat"), None)
    for row in rows:
        if base:
            row["p99_over_embedded_flat"] = row["api_latency_ms"]["p99"] / base["api_latency_ms"]["p99"]
    return {"gallery": len(vectors), "dim": int(vectors.shape[1]), "queries": len(queries), "k": k,
            "backends": rows, "migration": migration(work, chosen)}


def migration(work: Path, chosen: list[Variant]) -> dict[str, Any] | None:
    """`concord migrate` of the filled embedded flat store into a new collection (of the standalone Milvus when
    one runs, else a new Milvus Lite file): photos moved, seconds, and the rows that came back different or
    missing (every row is read back and compared)."""
    from server.store.backends import GalleryLocation
    from server.store.migrate import migrate

    names = {v.name: v for v in chosen}
    if "embedded-flat" not in names or not {"milvus-hnsw", "milvus-lite-flat"} & set(names):
        return None
    standalone = names.get("milvus-hnsw")
    target = (standalone.gallery.rsplit("/", 1)[0] + "/migrated" if standalone
              else f"milvus-lite:{work / 'migrated' / 'gallery.db'}")
    if standalone:
        _drop(GalleryLocation.parse(target).uri, "migrated")
    start = time.perf_counter()
    report = migrate(work / "embedded-flat", target, work / "migrated")
    seconds = time.perf_counter() - start
    if standalone:
        _drop(GalleryLocation.parse(target).uri, "migrated")
    print(f"backends migrate: {report.photos:,} photos in {seconds:.1f} s, {len(report.lost)} lost", flush=True)
    return {"photos": report.photos, "seconds": seconds, "lost": len(report.lost),
            "into": "Milvus standalone, FLAT" if standalone else "Milvus Lite, FLAT"}


def _recall(answers: list[list[int]], id_rows: dict[int, int], exact: np.ndarray, kth: np.ndarray,
            vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: a returned row counts when its exact score reaches the k-th best exact score."""
    hits = 0
    for answer, threshold, query in zip(answers, kth, queries, strict=True):
        rows = [id_rows[i] for i in answer[:k] if i in id_rows]
        hits += sum(1 for r in rows if float(vectors[r] @ query) >= threshold - TIE_EPS)
    return hits / (k * len(answers))


def run_backends(release: Path, sizes: tuple[int, ...], mixture: Any, query_count: int, k: int, work: Path,
                 names: tuple[str, ...] = VARIANTS, seed: int = 0) -> dict[str, Any]:
    """Every size: the chosen backends compared (a Milvus standalone server is started when one is chosen)."""
    from models.release import Release
    from server.bench.upgrade import cloud_pair

    model_id, _ = cloud_pair(Release.load(release, verify=False))
    milvus = None
    if "milvus-hnsw" in names:
        from server.bench.milvus_server import MilvusServer

        milvus = MilvusServer(work / "milvus-standalone").start()
    try:
        out = []
        for size in sizes:
            vectors = mixture.sample(size, seed + 1)
            queries = mixture.sample(query_count, seed + 2)
            size_work = work / f"backends-{size}"
            if milvus is not None:
                _drop(milvus.uri, "bench")
            out.append(compare(release, vectors, queries, model_id, k,
                               variants(names, size_work, milvus.address if milvus else None), size_work,
                               milvus.process.pid if milvus and milvus.process else None))
            for row in out[-1]["backends"]:
                lat = row["api_latency_ms"]
                print(f"backends {size:,} {row['backend']}: API p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms, "
                      f"recall@{k} {row[f'recall@{k}']:.3f}", flush=True)
    finally:
        if milvus is not None:
            milvus.stop()
    return {"sizes": out, "model_id": model_id, "cores": os.cpu_count(),
            "milvus": f"PyPI milvus 2.3.5 standalone (proxy time tick {TICK_MS} ms), pymilvus MilvusClient"}


def _drop(uri: str, collection: str) -> None:
    """Drop a previous size's benchmark collections from the standalone server."""
    from server.store.milvus_client import connect

    client = connect(uri)
    try:
        for name in (collection, f"{collection}_settings"):
            if client.has_collection(name):
                client.drop_collection(name)
    finally:
        client.close()


def run_part(plan: Any, sources: Any) -> dict[str, Any]:
    """The `backends` part of `concord bench`: the plan's sizes and API query count, the release's dim; writes
    `<out>/backends.md` beside the JSON the suite writes."""
    from models.benchmark.report import write_text
    from server.bench.data import mixture_for
    from server.bench.suite import old_cloud, report_head

    dim = old_cloud(sources.release).dim
    mixture = mixture_for(dim, plan.components, sources.seed, sources.embeddings)
    result = report_head(plan, sources)
    if sys.argv[0] in ("-c", "") or not result.get("command", "").startswith("concord"):
        result["command"] = "concord " + " ".join(sys.argv[1:])
    result["data"] = {**mixture.describe(), "gallery_seed": sources.seed + 1, "query_seed": sources.seed + 2}
    result.update(run_backends(sources.release, plan.sizes, mixture, plan.api_queries, plan.k,
                               sources.work / "backends", plan.backends, sources.seed))
    write_text(sources.out / "backends.md", backends_markdown(result))
    return result


def backends_markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table per gallery size."""
    lines = ["# Gallery backends through the API", "",
             f"Command: `{report.get('command', 'concord bench backends')}`. {report['milvus']}. Batch-1 "
             f"`POST /v1/search/embedding`, interleaved across the servers; recall against exact search.", ""]
    for size in report["sizes"]:
        k = size["k"]
        lines += [f"## {size['gallery']:,} vectors, {size['dim']} dims, {size['queries']} queries", "",
                  f"| backend | index | ingest vectors/s | index ready s | API p50 ms | API p99 ms | p99 / embedded "
                  f"flat | recall@{k} | API RSS MiB | Milvus RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in size["backends"]:
            lat = row["api_latency_ms"]
            milvus = row.get("milvus_server_rss_bytes")
            lines.append(f"| {row['backend']} | {row['index_described']} | {row['ingest']['vectors_per_s']:,.0f} | "
                         f"{row['ingest']['index_ready_s']:.1f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                         f"{row.get('p99_over_embedded_flat', float('nan')):.2f} | {row[f'recall@{k}']:.3f} | "
                         f"{row['api_rss_bytes'] / 2**20:,.0f} | "
                         f"{'' if milvus is None else f'{milvus / 2**20:,.0f}'} |")
        moved = size.get("migration")
        if moved:
            lines += ["", f"`concord migrate` of the embedded flat store into a new collection ({moved['into']}): "
                          f"{moved['photos']:,} photos in {moved['seconds']:.1f} s, {moved['lost']} lost or different "
                          f"(every row read back and compared)."]
        lines.append("")
    return "\n".join(lines) + "\n"
