"""`concord bench`: how fast Concord searches and encodes, and what an upgrade costs with and without re-indexing.

Parts, each writing `<out>/<part>.json` (then `<out>/summary.md` and the plots from the reports present):
- search: latency p50/p99, QPS and recall@10 of flat, HNSW and IVF FAISS indexes at each gallery size, their
  memory, and batch-1 search through the HTTP API against a bare FAISS call on the same vectors;
- encode: cloud photos/s at batch 16 with decoding (the ingest bound), edge batch-1 latency (fp32, int8),
  ingest photos/s through `POST /v1/photos` against the bare encoder;
- upgrade: time to make the new cloud model active at each gallery size against a full backfill's time, and
  the evaluation's mixed-gallery curve (partial backfill); `backends` (run alone): `server.bench.backends`.
Figures are medians (and percentiles) of interleaved runs; nothing here asserts a speed.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.report import header, shown_path, write_json
from models.manifest import ModelEntry
from server.bench import summary as bench_summary
from server.bench.data import DEFAULT_EMBEDDINGS, Mixture, mixture_for, seeded_mixture
from server.bench.encode import EncodeConfig, default_photos
from server.bench.search import IndexConfig, usable_cores

DEFAULT_OUT = Path("reports/bench")
PARTS = ("search", "encode", "upgrade")
EXTRA_PARTS = ("backends",)  # run only when named: the gallery backends side by side (`bench.backends`)
DEFAULT_EVALUATION = Path("reports/benchmark/caltech101.json")
API_TARGET_RATIO = 1.5
RECALL_TARGET = 0.95
P99_TARGET_MS = 10.0


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one benchmark run (`FULL` or `QUICK`)."""

    name: str
    sizes: tuple[int, ...]
    queries: int
    qps_queries: int
    api_queries: int
    upgrade_repeats: int
    index: IndexConfig = field(default_factory=IndexConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    dim: int | None = None
    """Dim of the search benchmark's vectors; None: the release's (its manifest), which real embeddings must have."""
    k: int = 10
    components: int = 100
    api_max: int = 1_000_000
    """Largest gallery searched through the HTTP API (the store is filled through its own add path)."""
    backends: tuple[str, ...] = ("embedded-flat", "embedded-hnsw", "milvus-hnsw")  # milvus-lite-flat: on request

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) <= self.k or list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"gallery sizes must be ascending and larger than k={self.k}, got {self.sizes}")
        if min(self.queries, self.qps_queries, self.api_queries, self.upgrade_repeats) < 1:
            raise ValueError("queries, qps_queries, api_queries and upgrade_repeats must be positive")


FULL = Plan("full", (10_000, 100_000, 1_000_000), queries=500, qps_queries=300, api_queries=200, upgrade_repeats=5)
QUICK = Plan("quick", (1_000, 3_000), queries=40, qps_queries=40, api_queries=15, upgrade_repeats=2,
             index=IndexConfig(ef_search=(16, 64), nprobe=(1, 8)),
             encode=EncodeConfig(photos=48, edge_rounds=10, edge_warmup=2), components=20)


@dataclass(frozen=True)
class Sources:
    """Where the benchmark reads (release, photos, embeddings, evaluation) and writes (out, work)."""

    release: Path
    photos: Path
    out: Path
    work: Path
    embeddings: Path | None = DEFAULT_EMBEDDINGS
    evaluation: Path = DEFAULT_EVALUATION
    api: bool = True
    seed: int = 0
    command: str | None = None
    """The command line to print in the reports (default: this process's arguments)."""


def default_sources(quick: bool = False, **given: Any) -> Sources:
    """Sources from the given values; unset ones from the settings (release: CONCORD_RELEASE or the shipped one)."""
    from server.settings import Settings

    values = {k: v for k, v in given.items() if v is not None}
    values.setdefault("release", Settings.from_env().release)
    values.setdefault("photos", default_photos())
    values.setdefault("out", DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    values.setdefault("work", Path(tempfile.gettempdir()) / f"concord-bench-{os.getpid()}-{time.time_ns()}")
    return Sources(**values)


def report_head(plan: Plan, sources: Sources) -> dict[str, Any]:
    head = header()
    if sources.command:
        head["command"] = sources.command
    head["plan"] = asdict(plan)
    head["sources"] = {k: shown_path(v) if isinstance(v, Path) else str(v) for k, v in asdict(sources).items()}
    head["sources"]["work"] = "a scratch folder in the temporary folder (removed at the end; --keep-work keeps it)"
    return head


# ----- search ---------------------------------------------------------------------------------------------------

def run_search(plan: Plan, sources: Sources, upgrade_to: str | None = None) -> dict[str, Any]:
    """Index figures at every size, and API-vs-bare flat search where the API is measured (then, with
    `upgrade_to`, one HTTP upgrade on each of those servers)."""
    from server.bench.search import bench_size, best_approximate

    threads = usable_cores()
    mixture = mixture_for(search_dim(plan, sources), plan.components, sources.seed, sources.embeddings)
    gallery = mixture.sample(max(plan.sizes), sources.seed + 1)
    queries = mixture.sample(plan.queries, sources.seed + 2)
    result = report_head(plan, sources)
    result["data"] = {**mixture.describe(), "gallery_seed": sources.seed + 1, "query_seed": sources.seed + 2,
                      "queries": "held out: an independent draw from the same mixture"}
    rows = []
    for size in plan.sizes:
        figures, built = bench_size(gallery[:size], queries, plan.k, plan.index, threads, plan.qps_queries,
                                    sources.seed)
        del built
        gc.collect()
        if sources.api and size <= plan.api_max:
            figures["api"] = _api_search(plan, sources, size, gallery, queries, threads, upgrade_to)
        rows.append(figures)
        print(_search_line(figures, plan.k), flush=True)
    result["sizes"] = rows
    largest = rows[-1]
    best = best_approximate(largest["variants"], plan.k, RECALL_TARGET)
    api_rows = [r for r in rows if r.get("api")]
    result["targets"] = {
        "api_flat_p50_within_1_5x": _api_target(api_rows, plan),
        "approximate_recall_0_95_p99_under_10ms": {
            "gallery": largest["gallery"], "best": best and {"name": best["name"], "p99_ms": best["latency_ms"]["p99"],
                                                              f"recall@{plan.k}": best[f"recall@{plan.k}"]},
            "passed": bool(best and best["latency_ms"]["p99"] < P99_TARGET_MS)}}
    return result


def _api_search(plan: Plan, sources: Sources, size: int, gallery: np.ndarray, queries: np.ndarray,
                threads: int, upgrade_to: str | None) -> dict[str, Any]:
    """Fill (or reuse) the store of this size, start a server on it, time API vs bare flat search; then, with
    `upgrade_to`, upgrade that server's active model once (for the upgrade part)."""
    from server.bench.driver import Server
    from server.bench.gallery import api_vs_bare
    from server.bench.upgrade import upgrade_on
    from server.settings import Settings

    old, _ = _cloud_models(sources.release)
    dim = old_cloud(sources.release).dim
    if dim == gallery.shape[1]:
        vectors, note = gallery[:size], "the search benchmark's gallery vectors"
    else:
        mixture = _store_mixture(plan, sources, dim)
        vectors, note = mixture.sample(size, sources.seed + 1), f"{dim}-d (the release's dim): {mixture.source}"
        queries = mixture.sample(plan.api_queries, sources.seed + 2)
    store = _ensure_store(plan, sources, size, lambda: (vectors, note))
    with Server(sources.release, _store_dir(sources, size), sources.work / f"server-{size}.log") as server:
        figures = api_vs_bare(server, vectors, queries[:plan.api_queries], old, plan.k, threads,
                              Settings().faiss_threads)
        figures["server_start_s"] = server.start_s
        if upgrade_to:  # the same server then serves the upgrade part's one HTTP upgrade (saves a start)
            figures["http_upgrade"] = upgrade_on(server, upgrade_to)
    return {**figures, "store": store, "query_model": old}


def _api_target(api_rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    if not api_rows:
        return {"measured": False, "reason": "the API was not measured (--no-api)", "passed": None}
    api = api_rows[-1]["api"]
    ratio = api["ratio_p50_api_over_bare_same_threads"]
    return {"measured": True, "gallery": api["gallery"], "at_target_size": api["gallery"] >= max(FULL.sizes),
            "ratio_p50": ratio, "ratio_p50_vs_bare_1_thread": api["ratio_p50_api_over_bare_1_thread"],
            "passed": ratio <= API_TARGET_RATIO,
            "passed_vs_bare_1_thread": api["ratio_p50_api_over_bare_1_thread"] <= API_TARGET_RATIO}


def _search_line(figures: dict[str, Any], k: int) -> str:
    parts = [f"{v['name']} p50 {v['latency_ms']['p50']:.3f} ms p99 {v['latency_ms']['p99']:.3f} ms "
             f"R@{k} {v[f'recall@{k}']:.3f}" for v in figures["variants"]]
    api = figures.get("api")
    tail = (f"; API p50 {api['latency_ms']['api']['p50']:.3f} ms = {api['ratio_p50_api_over_bare_same_threads']:.2f}x "
            f"bare" if api else "")
    return f"search {figures['gallery']:,}: " + "; ".join(parts) + tail


# ----- stores shared by search (API) and upgrade ------------------------------------------------------------------
def _cloud_models(release: Path) -> tuple[str, str]:
    from models.release import Release
    from server.bench.upgrade import cloud_pair

    return cloud_pair(Release.load(release, verify=False))


def search_dim(plan: Plan, sources: Sources) -> int:
    """The search benchmark's dim: the plan's when set, else the release's."""
    return plan.dim or old_cloud(sources.release).dim


def old_cloud(release: Path) -> ModelEntry:
    """The manifest entry of the cloud model the benchmark's stores are indexed by."""
    from models.manifest import Manifest

    return Manifest.load(release).model(_cloud_models(release)[0])


def _store_mixture(plan: Plan, sources: Sources, dim: int) -> Mixture:
    """Vectors for stores of another dim than the search benchmark's (a test release): the seeded mixture."""
    return seeded_mixture(dim, plan.components, sources.seed)


def _store_dir(sources: Sources, size: int) -> Path:
    return sources.work / "stores" / str(size)


def _ensure_store(plan: Plan, sources: Sources, size: int,
                  make: Callable[[], tuple[np.ndarray, str]]) -> dict[str, Any]:
    """The benchmark store of `size` (built from `make()` = vectors and their description, once per run)."""
    import json

    from server.bench.gallery import build_store

    entry = old_cloud(sources.release)
    folder = _store_dir(sources, size)
    marker = folder / "bench.json"
    key = {"vectors": size, "dim": entry.dim, "space": entry.space, "model": entry.id, "seed": sources.seed}
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return dict(json.loads(marker.read_text())["store"])
    vectors, note = make()
    store = {**build_store(folder, vectors, entry.id, entry.id, entry.space), "vectors_source": note}
    marker.write_text(json.dumps({"key": key, "store": store}))
    return store


def _upgrade_vectors(plan: Plan, sources: Sources, size: int) -> tuple[np.ndarray, str]:
    """Vectors for an upgrade-only store: the search benchmark's mixture at the release's dim."""
    dim = old_cloud(sources.release).dim
    mixture = (mixture_for(dim, plan.components, sources.seed, sources.embeddings)
               if dim == search_dim(plan, sources) else _store_mixture(plan, sources, dim))
    return mixture.sample(size, sources.seed + 1), f"{dim}-d: {mixture.source}"


# ----- encode ---------------------------------------------------------------------------------------------------

def run_encode(plan: Plan, sources: Sources) -> dict[str, Any]:
    """Cloud photos/s, edge latency and API ingest on a sample of real photos."""
    from server.bench.encode import api_ingest, load_photos
    from server.bench.encode import run_encode as encode_figures

    photos = load_photos(sources.photos, plan.encode.photos)
    result = report_head(plan, sources)
    result.update(encode_figures(sources.release, photos, plan.encode))
    result["photo_source"] = str(sources.photos)
    if sources.api:
        result["api_ingest"] = api_ingest(sources.release, photos, plan.encode, sources.work / "ingest",
                                          sources.work / "server-ingest.log")
    for row in result["cloud"]:
        print(f"encode {row['model_id']}: {row['photos_per_s_with_decoding']:.1f} photos/s with decoding, "
              f"{row['photos_per_s_encoder_only']:.1f} encoder only (batch {row['batch']})", flush=True)
    return result


# ----- upgrade --------------------------------------------------------------------------------------------------

def run_upgrade(plan: Plan, sources: Sources, encode: dict[str, Any] | None = None,
                search: dict[str, Any] | None = None) -> dict[str, Any]:
    """Upgrade time at every size (HTTP once, service function `repeats` times) against a full backfill.

    HTTP upgrades the search part already made on its servers (same store) are taken from `search`.
    """
    from server.bench.upgrade import backfill_estimate, growth, mixed_curve, upgrade_over_http, upgrade_service

    old, new = _cloud_models(sources.release)
    rate, rate_source = _backfill_rate(plan, sources, new, encode)
    result = report_head(plan, sources)
    result.update({"old_model": old, "new_model": new, "backfill_rate": {"photos_per_s": rate, "source": rate_source}})
    done_over_http = {r["gallery"]: r["api"]["http_upgrade"] for r in (search or {}).get("sizes", [])
                      if r.get("api", {}).get("http_upgrade")}
    rows = []
    for size in plan.sizes:
        store = _ensure_store(plan, sources, size, partial(_upgrade_vectors, plan, sources, size))
        row: dict[str, Any] = {"gallery": size, "store": store}
        if size in done_over_http:
            row["http"] = done_over_http[size]
        elif sources.api:
            row["http"] = upgrade_over_http(sources.release, _store_dir(sources, size), new,
                                            sources.work / f"server-{size}.log")
        row["service"] = upgrade_service(sources.release, _store_dir(sources, size), old, new, plan.upgrade_repeats)
        upgrade_s = row["service"]["latency_ms"]["p50"] / 1000
        row["backfill_s"] = backfill_estimate(size, rate)
        row["backfill_over_upgrade"] = row["backfill_s"] / upgrade_s
        rows.append(row)
        print(f"upgrade {size:,}: {upgrade_s * 1000:.1f} ms (p50) vs backfill {row['backfill_s']:.0f} s "
              f"({row['backfill_over_upgrade']:.0f}x)", flush=True)
    result["sizes"] = rows
    result["growth"] = growth([r["gallery"] for r in rows], [r["service"]["latency_ms"]["p50"] for r in rows])
    result["mixed_gallery"] = mixed_curve(sources.evaluation)
    return result


def _backfill_rate(plan: Plan, sources: Sources, new: str, encode: dict[str, Any] | None) -> tuple[float, str]:
    """The new cloud model's photos/s with decoding: from this run's encode part, else measured now."""
    rows = [r for r in (encode or {}).get("cloud", []) if r["model_id"] == new]
    if not rows:
        from models.release import Release
        from server.bench.encode import cloud_throughput, load_photos

        photos = [b for _, b in load_photos(sources.photos, plan.encode.photos)]
        rows = [r for r in cloud_throughput(Release.load(sources.release), photos, plan.encode)
                if r["model_id"] == new]
    row = rows[0]
    return row["photos_per_s_with_decoding"], (
        f"{new} at batch {row['batch']} on {row['batches'] * row['batch']} real photos from {sources.photos}, "
        f"decoding, resize and crop included (onnxruntime, {plan.encode.threads or 'all'} threads)")


# ----- all ------------------------------------------------------------------------------------------------------

def run(parts: tuple[str, ...], plan: Plan, sources: Sources, keep_work: bool = False) -> dict[str, Any]:
    """Run the parts in order, write each part's JSON, then the summary and plots; returns the reports."""
    unknown = [p for p in parts if p not in PARTS + EXTRA_PARTS]
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {unknown}; choose from {', '.join(PARTS + EXTRA_PARTS)} or all")
    results: dict[str, Any] = {}
    plan = replace(plan, dim=search_dim(plan, sources))  # the reports record the dim that ran
    sources.work.mkdir(parents=True, exist_ok=True)  # scratch: stores and server logs, removed at the end
    try:
        for part in PARTS + EXTRA_PARTS:
            if part not in parts:
                continue
            start = time.perf_counter()
            if part == "backends":
                from server.bench.backends import run_part
                results[part] = run_part(plan, sources)
            elif part == "search":
                upgrade_to = _cloud_models(sources.release)[1] if "upgrade" in parts else None
                results[part] = run_search(plan, sources, upgrade_to)
            elif part == "encode":
                results[part] = run_encode(plan, sources)
            else:
                results[part] = run_upgrade(plan, sources, results.get("encode"), results.get("search"))
            results[part]["seconds"] = time.perf_counter() - start
            write_json(sources.out, part, results[part])
    finally:
        if not keep_work:
            shutil.rmtree(sources.work, ignore_errors=True)
    written = bench_summary.write_all(sources.out)
    results["written"] = [str(p) for p in written]
    return results


def plan_for(quick: bool, sizes: tuple[int, ...] | None = None) -> Plan:
    """The full or quick plan, optionally with other gallery sizes."""
    plan = QUICK if quick else FULL
    return replace(plan, sizes=tuple(sorted(sizes))) if sizes else plan


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    """'10000,100000' -> (10000, 100000); None stays None."""
    if not text:
        return None
    try:
        return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated integers (e.g. 10000,100000), got {text!r}") from None


def missing_embeddings(sources: Sources) -> bool:
    """Whether the embeddings the search vectors are to be fitted to are not there (the seeded mixture stands in)."""
    return sources.embeddings is not None and not Path(sources.embeddings).exists()


def main(part: str = "all", quick: bool = False, sizes: str | None = None, api: bool = True,
         keep_work: bool = False, backends: str | None = None, **paths: Path | None) -> dict[str, Any]:
    """What `concord bench PART` runs: check the inputs, run the parts, print where the reports went."""
    parts = PARTS if part == "all" else (part,)
    if part != "all" and part not in PARTS + EXTRA_PARTS:
        raise ValueError(f"unknown benchmark {part!r}: choose all, {', '.join(PARTS + EXTRA_PARTS)}")
    plan = plan_for(quick, parse_sizes(sizes))
    plan = replace(plan, backends=tuple(b.strip() for b in backends.split(","))) if backends else plan
    sources = replace(default_sources(quick, **paths), api=api)
    if not (sources.release / "manifest.json").is_file():
        raise FileNotFoundError(f"no release at {sources.release} (no manifest.json): pass --release or set "
                                f"CONCORD_RELEASE")
    if {"encode", "upgrade"} & set(parts) and not sources.photos.exists():
        raise FileNotFoundError(f"no photos at {sources.photos}: pass --photos (a folder or a list file) or set "
                                f"CONCORD_DATA to the Caltech-101 folder")
    if {"search", "upgrade", "backends"} & set(parts) and missing_embeddings(sources):
        print(f"concord bench: warning: no embeddings at {sources.embeddings} (`concord evaluate` writes them, after "
              f"`concord restore` or `concord benchmark`): the gallery vectors come from a seeded random mixture, so "
              f"index recall and speed will differ from the README's", file=sys.stderr, flush=True)
    print(f"concord bench {part} ({plan.name}): sizes {', '.join(f'{s:,}' for s in plan.sizes)}; reports -> "
          f"{sources.out}", flush=True)
    results = run(parts, plan, sources, keep_work)
    print("wrote " + ", ".join(results["written"]) + (f"; scratch kept in {sources.work}" if keep_work else ""))
    return results
