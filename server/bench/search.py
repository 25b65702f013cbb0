"""Index-side search benchmark: latency, QPS, recall@k and memory of flat, HNSW and IVF FAISS indexes.

For each gallery size the indexes are built directly over the same mixture vectors (`bench_data`). Every
query runs through every index variant in one interleaved loop on one FAISS thread (batch 1), so the
latencies compare side by side; QPS on all threads runs one batch-1 query stream per core. Recall@k is
measured against the exact (flat) neighbours, tie-aware: a returned vector counts when its exact score is
at least the k-th best exact score (less 1e-5), so float rounding at a tie never reads as a miss.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.benchmark.report import interleave, latency_ms, rss_bytes

TIE_EPS = 1e-5


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class IndexConfig:
    """Which approximate indexes to build and which search settings to sweep."""

    ef_search: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    nprobe: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    hnsw_m: int = 32
    ef_construction: int = 40
    ivf_lists_per_sqrt: float = 1.0
    """IVF lists = this x sqrt(gallery size)."""


@dataclass
class Built:
    """One index built over a gallery, with what it cost."""

    family: str
    index: Any
    build_s: float
    serialized_bytes: int
    rss_delta_bytes: int
    facts: dict[str, Any] = field(default_factory=dict)

    def memory(self, count: int) -> dict[str, Any]:
        per_million = 1e6 / count
        return {"family": self.family, "build_s": self.build_s, "serialized_bytes": self.serialized_bytes,
                "rss_delta_bytes": self.rss_delta_bytes,
                "serialized_mb_per_million": self.serialized_bytes * per_million / 2**20,
                "rss_delta_mb_per_million": self.rss_delta_bytes * per_million / 2**20, **self.facts}


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), so RSS deltas measure what a build keeps."""
    import ctypes
    import ctypes.util

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _measure(family: str, make: Any, threads: int) -> Built:
    """Build an index with `make()` on `threads` FAISS threads; time it, weigh it and read the RSS delta."""
    import faiss

    faiss.omp_set_num_threads(threads)
    trim_heap()
    before = rss_bytes()
    start = time.perf_counter()
    index, facts = make()
    build_s = time.perf_counter() - start
    trim_heap()
    delta = rss_bytes() - before
    size = int(faiss.serialize_index(index).size)
    return Built(family, index, build_s, size, delta, facts)


def build_flat(gallery: np.ndarray, threads: int) -> Built:
    """The store's exact index: IndexIDMap2(IndexFlatIP), ids = row numbers."""
    import faiss

    def make() -> tuple[Any, dict[str, Any]]:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(gallery.shape[1]))
        index.add_with_ids(gallery, np.arange(len(gallery), dtype=np.int64))
        return index, {"type": "IndexIDMap2(IndexFlatIP)"}

    return _measure("flat", make, threads)


def build_hnsw(gallery: np.ndarray, config: IndexConfig, threads: int) -> Built:
    """HNSW graph over the vectors (inner product)."""
    import faiss

    def make() -> tuple[Any, dict[str, Any]]:
        index = faiss.IndexHNSWFlat(gallery.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.add(gallery)
        return index, {"type": f"IndexHNSWFlat(M={config.hnsw_m}, efConstruction={config.ef_construction})"}

    return _measure("hnsw", make, threads)


def build_ivf(gallery: np.ndarray, config: IndexConfig, threads: int, seed: int) -> Built:
    """IVF-Flat with sqrt(n)-scaled lists, k-means trained on a sample of at most 50 points a list."""
    import faiss

    count, dim = gallery.shape
    lists = max(1, round(config.ivf_lists_per_sqrt * np.sqrt(count)))

    def make() -> tuple[Any, dict[str, Any]]:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(count, size=min(count, 50 * lists), replace=False)
        index.cp.min_points_per_centroid = 1
        index.train(gallery[np.sort(sample)])
        index.add(gallery)
        return index, {"type": f"IndexIVFFlat(nlist={lists})", "nlist": lists, "train_points": len(sample)}

    return _measure("ivf", make, threads)


@dataclass(frozen=True)
class Variant:
    """One way to search: an index and its search-time setting."""

    name: str
    family: str
    setting: dict[str, int]
    index: Any
    params: Any

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=self.params)


def variants(built: dict[str, Built], config: IndexConfig) -> list[Variant]:
    """Flat, then HNSW at each efSearch, then IVF at each nprobe (those not above the list count)."""
    import faiss

    def hnsw(ef: int) -> Any:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = ef
        return params

    def ivf(nprobe: int) -> Any:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        return params

    found = [Variant("flat", "flat", {}, built["flat"].index, None)]
    if "hnsw" in built:
        found += [Variant(f"hnsw ef={ef}", "hnsw", {"efSearch": ef}, built["hnsw"].index, hnsw(ef))
                  for ef in config.ef_search]
    if "ivf" in built:
        lists = built["ivf"].index.nlist
        found += [Variant(f"ivf nprobe={p}", "ivf", {"nprobe": p}, built["ivf"].index, ivf(p))
                  for p in config.nprobe if p <= lists]
    return found


def recall_at_k(found: np.ndarray, gallery: np.ndarray, queries: np.ndarray, kth_exact: np.ndarray) -> float:
    """Tie-aware recall@k: share of the k returned ids whose exact score reaches the k-th exact score."""
    k = found.shape[1]
    hits = 0
    for row, ids in enumerate(found):
        ids = np.unique(ids[ids >= 0])
        if ids.size:
            scores = gallery[ids] @ queries[row]
            hits += min(k, int(np.sum(scores >= kth_exact[row] - TIE_EPS)))
    return hits / (k * len(found))


def latency_and_recall(variants_: list[Variant], gallery: np.ndarray, queries: np.ndarray, k: int,
                       kth_exact: np.ndarray) -> dict[str, dict[str, Any]]:
    """Batch-1 latency on one FAISS thread, every query through every variant in turn; recall of the answers."""
    import faiss

    faiss.omp_set_num_threads(1)
    answers = {v.name: np.full((len(queries), k), -1, dtype=np.int64) for v in variants_}

    def call(variant: Variant) -> Any:
        def run(i: int) -> None:
            answers[variant.name][i] = variant.search(queries[i:i + 1], k)[1][0]
        return run

    for variant in variants_:  # warm-up: first touches of the index memory are not timed
        variant.search(queries[: min(5, len(queries))], k)
    times = interleave({v.name: call(v) for v in variants_}, len(queries))
    rows = {}
    for v in variants_:
        stats = latency_ms(times[v.name])
        rows[v.name] = {"name": v.name, "family": v.family, "setting": v.setting, "latency_ms": stats,
                        "qps_1_thread": 1000.0 / stats["mean"],
                        f"recall@{k}": recall_at_k(answers[v.name], gallery, queries, kth_exact)}
    return rows


def qps_all_threads(variants_: list[Variant], queries: np.ndarray, k: int, threads: int,
                    rounds: int = 3) -> dict[str, float]:
    """Queries per second with `threads` concurrent batch-1 query streams (one FAISS thread each); median of rounds.

    The rounds rotate the order of the variants, like the latency loop.
    """
    import faiss

    faiss.omp_set_num_threads(1)
    slices = [queries[i::threads] for i in range(threads)]

    def stream(variant: Variant, part: np.ndarray) -> None:
        for i in range(len(part)):
            variant.search(part[i:i + 1], k)

    results: dict[str, list[float]] = {v.name: [] for v in variants_}
    with ThreadPoolExecutor(threads) as pool:
        for round_ in range(rounds):
            shift = round_ % len(variants_)
            for v in variants_[shift:] + variants_[:shift]:
                start = time.perf_counter()
                list(pool.map(lambda part, v=v: stream(v, part), slices))
                results[v.name].append(len(queries) / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in results.items()}


def bench_size(gallery: np.ndarray, queries: np.ndarray, k: int, config: IndexConfig, threads: int,
               qps_queries: int, seed: int) -> tuple[dict[str, Any], dict[str, Built]]:
    """Build the indexes over one gallery and measure them; returns the figures and the built indexes."""
    import faiss

    count = len(gallery)
    built = {"flat": build_flat(gallery, threads)}
    built["ivf"] = build_ivf(gallery, config, threads, seed)
    built["hnsw"] = build_hnsw(gallery, config, threads)
    faiss.omp_set_num_threads(threads)
    exact_scores, _ = built["flat"].index.search(queries, k)
    chosen = variants(built, config)
    rows = latency_and_recall(chosen, gallery, queries, k, exact_scores[:, -1])
    qps = qps_all_threads(chosen, queries[:qps_queries], k, threads)
    for name, value in qps.items():
        rows[name]["qps_all_threads"] = value
    figures = {"gallery": count, "queries": len(queries), "k": k, "threads_all": threads,
               "median_top1_cosine": float(np.median(exact_scores[:, 0])),
               f"median_top{k}_cosine": float(np.median(exact_scores[:, -1])),
               "memory": {name: b.memory(count) for name, b in built.items()},
               "variants": list(rows.values())}
    return figures, built


def best_approximate(rows: list[dict[str, Any]], k: int, min_recall: float) -> dict[str, Any] | None:
    """The approximate variant with the lowest p99 among those reaching `min_recall` recall@k."""
    good = [r for r in rows if r["family"] != "flat" and r[f"recall@{k}"] >= min_recall]
    return min(good, key=lambda r: r["latency_ms"]["p99"]) if good else None
