"""Gallery stores for the benchmarks, filled through the store's own add path, and the HTTP-vs-bare search timing.

A benchmark store holds synthetic vectors (no photo bytes: each row's content hash is the sha256 of a label)
under the release's old cloud model, written with `GalleryStore.add` in large batches: the same checks,
SQLite transactions and FAISS adds as the server's own writes, only without encoding photos first.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.report import interleave, latency_ms
from server.bench.driver import Server

BATCH = 20_000


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_store(data_dir: Path, vectors: np.ndarray, model_id: str, active_model: str, space: str) -> dict[str, Any]:
    """A store in `data_dir/gallery` (the server's layout) holding `vectors` made by `model_id`, ids 1..n.

    An existing folder is replaced. Returns how long the writes took and the bytes on disk.
    """
    from server.opening import start_gallery
    from server.store import GalleryStore, NewPhoto

    if data_dir.exists():
        shutil.rmtree(data_dir)
    folder = data_dir / "gallery"
    start = time.perf_counter()
    store = GalleryStore(folder, dim=vectors.shape[1], keep_bytes=False)
    try:
        start_gallery(store, space, active_model)
        for first in range(0, len(vectors), BATCH):
            rows = range(first, min(len(vectors), first + BATCH))
            store.add([NewPhoto(hashlib.sha256(f"bench-vector-{i}".encode()).hexdigest(), vectors[i], model_id,
                                {}) for i in rows])
        ids = store.catalogue_ids()
    finally:
        store.close()
    seconds = time.perf_counter() - start
    if ids != list(range(1, len(vectors) + 1)):
        raise RuntimeError(f"{folder}: the store numbered its {len(vectors)} rows unlike 1..n; the benchmark "
                           f"compares ids with a bare index that assumes so")
    return {"vectors": len(vectors), "seconds": seconds, "vectors_per_s": len(vectors) / seconds,
            "disk_bytes": folder_bytes(folder), "route": "GalleryStore.add in batches of "
            f"{BATCH} (SQLite WAL, synchronous=FULL; no photo bytes), then close() writes the FAISS snapshot"}


def api_vs_bare(server: Server, vectors: np.ndarray, queries: np.ndarray, model_id: str, k: int,
                threads: int, server_threads: int = 1) -> dict[str, Any]:
    """Batch-1 flat search through `POST /v1/search/embedding` against bare FAISS on the same vectors, interleaved.

    The bare index is the store's kind, `IndexIDMap2(IndexFlatIP)` with the store's ids, searched with FAISS on
    one thread and on `threads` (one per core); the server runs FAISS on `server_threads` (its setting).
    """
    import faiss

    bare = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    bare.add_with_ids(vectors, np.arange(1, len(vectors) + 1, dtype=np.int64))
    got: dict[str, list[list[int]]] = {"api": [], "bare": []}

    def api(i: int) -> None:
        got["api"].append([hit.id for hit in server.client.search_embedding(queries[i], model_id, k).hits])

    def bare_on(count: int) -> Any:
        def run(i: int) -> None:
            faiss.omp_set_num_threads(count)
            ids = bare.search(queries[i:i + 1], k)[1][0]
            if count == 1:
                got["bare"].append([int(x) for x in ids])
        return run

    for i in range(min(3, len(queries))):  # warm-up: the first touches of both indexes are not timed
        api(i)
        bare_on(1)(i)
    got = {"api": [], "bare": []}
    same = "bare_1_thread" if server_threads == 1 else f"bare_{server_threads}_threads"
    calls = {"api": api, "bare_1_thread": bare_on(1), f"bare_{threads}_threads": bare_on(threads),
             same: bare_on(server_threads)}
    times = interleave(calls, len(queries))
    faiss.omp_set_num_threads(1)
    stats = {name: latency_ms(values) for name, values in times.items()}
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got["api"], got["bare"], strict=True)]))
    api_p50 = stats["api"]["p50"]
    return {"gallery": len(vectors), "dim": int(vectors.shape[1]), "queries": len(queries), "k": k,
            "server_faiss_threads": server_threads, "latency_ms": stats,
            "ratio_p50_api_over_bare_same_threads": api_p50 / stats[same]["p50"],
            "ratio_p50_api_over_bare_1_thread": api_p50 / stats["bare_1_thread"]["p50"],
            "overhead_ms_p50_vs_same_threads": api_p50 - stats[same]["p50"],
            "top_k_agreement_api_vs_bare": agree}
