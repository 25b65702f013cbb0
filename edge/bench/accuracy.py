"""What int8 costs in retrieval: int8-edge and fp32-edge queries searched against the cloud gallery.

Benchmark protocol (DESIGN.md): queries are the `test.txt` photos outside BACKGROUND_Google, the
gallery is every `train.txt` photo (background included) encoded by the cloud model, a gallery photo is
relevant to a query of its own class. Figures: Recall@1, Recall@5 and mAP, overall and on old / new
classes, plus how far int8 moves from fp32 (cosine, rank-1 agreement, negative flips). Given the release that
devices run now (`previous`), also that release's int8 file of the model and what changes for its users when the
file is renewed: the same agreement figures, from the old file to the new one.

The split, the metrics and the cached embeddings are the benchmark's own, torch-free: `models.benchmark`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.benchmark import report
from models.benchmark.caltech import BACKGROUND, NUM_OLD_CLASSES, Split, load_split
from models.benchmark.embeddings import cached, encode_paths, names_digest
from models.benchmark.report import fmt

if TYPE_CHECKING:
    from models.manifest import ModelEntry
    from models.release import Release

STEM = "device_accuracy"
DEFAULT_CACHE = Path("cache/edge")
PREVIOUS = "previous device-int8"
"""The figures' key of the previous release's int8 file."""


def run_accuracy(release_folder: str | Path, edge_id: str | None = None, cloud_id: str | None = None,
                 data: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                 out_dir: str | Path | None = report.DEFAULT_REPORT_DIR, limit: int | None = None,
                 previous: str | Path | None = None) -> dict[str, Any]:
    """Measure int8 and fp32 edge queries against the cloud gallery; write the report; return it.

    `limit` keeps every n-th photo of gallery and queries so that the total is about `limit` each
    (for a quick look; the report says so). `previous`: a release folder holding the int8 file of the same edge
    model that devices run now, to measure what renewing it changes.
    """
    from models.release import Release

    release = Release.load(release_folder, verify=True)
    manifest = release.manifest
    edge = manifest.model(edge_id) if edge_id else manifest.newest("edge")
    cloud = manifest.model(cloud_id) if cloud_id else manifest.cloud_of(edge.id)
    sources = _query_sources(release, edge, previous)
    split = _thin(load_split(data), limit)
    gallery_paths = [split.image_dir / p for p in split.gallery]
    query_paths = [split.image_dir / p for p in split.queries]
    cache = Path(cache_dir)

    def encode_gallery() -> np.ndarray:
        return encode_paths([release.encoder(cloud.id, "server")], gallery_paths, f"gallery ({cloud.id})")[0]

    gallery = cached(cache, f"gallery-{cloud.id}-{cloud.sha256[:16]}-{names_digest(split.gallery)}", encode_gallery)
    queries = {}
    for name, (source, entry, variant) in sources.items():

        def encode_queries(source: Release = source, v: str = variant) -> np.ndarray:
            return encode_paths([source.encoder(edge.id, v)], query_paths, f"queries ({v})")[0]

        sha = entry.variants[variant].sha256
        queries[name] = cached(cache, f"queries-{edge.id}-{sha[:16]}-{names_digest(split.queries)}", encode_queries)
    from models.benchmark.metrics import evaluate_retrieval  # torch-free (numpy + faiss): the benchmark's metrics

    old = (split.query_labels >= 0) & (split.query_labels < NUM_OLD_CLASSES)
    found = {v: evaluate_retrieval(q, gallery, split.query_labels, split.gallery_labels, old)
             for v, q in queries.items()}
    result: dict[str, Any] = {
        **report.header(), "release": report.shown_path(release.folder), "edge": edge.id, "cloud": cloud.id,
        "protocol": {"queries": len(query_paths), "gallery": len(gallery_paths), "thinned_to": limit,
                     "data": str(split.image_dir.parent), "metrics": "models.benchmark.metrics.evaluate_retrieval"},
        "figures": {v: r.to_dict() for v, r in found.items()},
    }
    if "device-int8" in queries and "device-fp32" in queries:
        result["int8_vs_fp32"] = _agreement(queries["device-fp32"], queries["device-int8"], gallery,
                                            found["device-fp32"].hits_at_1, found["device-int8"].hits_at_1)
    if PREVIOUS in queries:
        old_release, old_entry, _ = sources[PREVIOUS]
        result["previous"] = {"release": report.shown_path(old_release.folder),
                              "sha256": old_entry.variants["device-int8"].sha256}
        result["int8_vs_previous"] = _agreement(queries[PREVIOUS], queries["device-int8"], gallery,
                                                found[PREVIOUS].hits_at_1, found["device-int8"].hits_at_1)
    if out_dir is not None:
        result["written"] = [str(p) for p in report.write(out_dir, STEM, result, markdown(result))]
    return result


def _query_sources(release: Release, edge: ModelEntry,
                   previous: str | Path | None) -> dict[str, tuple[Release, ModelEntry, str]]:
    """Each query file to measure, by its figures' key, as (release, entry, variant): the edge model's device files,
    and the previous release's int8 file of the same model when given."""
    from models.release import Release

    sources: dict[str, tuple[Release, ModelEntry, str]] = {
        v: (release, edge, v) for v in ("device-fp32", "device-int8") if v in edge.variants}
    if not sources:
        raise KeyError(f"edge model {edge.id!r} has no device file (device-fp32 / device-int8)")
    if previous is not None:
        if "device-int8" not in edge.variants:
            raise KeyError(f"edge model {edge.id!r} has no device-int8 file to compare with the previous one")
        old_release = Release.load(previous, verify=True)
        old_entry = old_release.manifest.model(edge.id)
        if "device-int8" not in old_entry.variants:
            raise KeyError(f"the previous release {previous} holds no device-int8 file of {edge.id!r}")
        sources[PREVIOUS] = (old_release, old_entry, "device-int8")
    return sources


def _agreement(a: np.ndarray, b: np.ndarray, gallery: np.ndarray, hits_a: np.ndarray,
               hits_b: np.ndarray) -> dict[str, float]:
    """How far queries `b` move from `a` (int8 from fp32, a renewed file from the old): cosine, same rank-1 photo,
    negative and positive flips."""
    from models.benchmark.metrics import flip_rates

    cosine = np.sum(a * b, axis=1)
    top_a, top_b = np.argmax(a @ gallery.T, axis=1), np.argmax(b @ gallery.T, axis=1)
    nfr, pfr = flip_rates(hits_a, hits_b)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "same_top1": float(np.mean(top_a == top_b)), "negative_flip_rate": nfr, "positive_flip_rate": pfr,
            "recall@1_change": float(np.mean(hits_b) - np.mean(hits_a))}


def _thin(split: Split, limit: int | None) -> Split:
    if limit is None:
        return split
    g = max(1, len(split.gallery) // limit)
    q = max(1, len(split.queries) // limit)
    return Split(split.image_dir, split.gallery[::g], split.gallery_labels[::g], split.queries[::q],
                 split.query_labels[::q])


def markdown(result: dict[str, Any]) -> str:
    """The accuracy report as markdown."""
    p = result["protocol"]
    rows = []
    for variant, groups in result["figures"].items():
        for group, f in groups.items():
            rows.append([f"{result['edge']} {variant}", result["cloud"], group, str(f["queries"]),
                         *(fmt(f[key], 4) for key in ("recall@1", "recall@5", "map"))])
    text = (f"# Edge int8 vs fp32: queries from the device against the cloud gallery\n\n"
            f"{p['queries']} queries (test.txt without {BACKGROUND}), gallery of {p['gallery']} photos "
            f"(train.txt with {BACKGROUND}) encoded by `{result['cloud']}`"
            f"{' (thinned)' if p['thinned_to'] else ''}.\n\n")
    text += report.table(["query model", "gallery model", "classes", "queries", "Recall@1", "Recall@5", "mAP"],
                         rows)
    if "int8_vs_fp32" in result:
        text += "\nint8 against fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in result["int8_vs_fp32"].items())
        text += "\n"
    if "int8_vs_previous" in result:
        old = result["previous"]
        text += (f"\nint8 against the previous int8 file ({old['release']}, sha256 {old['sha256'][:12]}), what its "
                 f"users see change: " + ", ".join(f"{k} {v:.4f}" for k, v in result["int8_vs_previous"].items()))
        text += "\n"
    return text + "\n" + report.context_markdown(result)
