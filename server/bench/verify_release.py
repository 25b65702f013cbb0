"""`concord verify-release`: the shipped models reproduce, THROUGH THE SERVER, the figures in their manifest.

For each checked pair M(query, gallery) a real server (`concord serve` in a child process on loopback) with the
gallery model active indexes the benchmark gallery (Caltech-101 `train.txt`, BACKGROUND_Google included) through
`POST /v1/photos` with metadata {"path", "label"}, then every query (`test.txt` without BACKGROUND_Google) is
searched: an edge model's queries are encoded on the client with its device file and sent to
`POST /v1/search/embedding` (the edge client), a cloud model's as photos to `POST /v1/search/photo` (the server
encodes them). Recall@k: the label of one of the k hits equals the query's class (a distractor, label -1, never
does). Each store lives in a work folder keyed by the model file and the photo list, so an interrupted run
resumes: photos the store holds already (by sha256) are not sent again.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.benchmark.embeddings import cached, encode_paths, names_digest
from models.benchmark.report import fmt
from models.manifest import Manifest

if TYPE_CHECKING:
    from edge.client import SearchResult

STEM = "verify"
DEFAULT_OUT = Path("reports/release")
DEFAULT_WORK = Path("cache/verify-release")
TOLERANCE = 0.005
KS = (1, 5)
LOOKUP_CHUNK = 5000


@dataclass(frozen=True)
class Pair:
    """One checked figure: queries of `query` searched in a gallery indexed by `gallery`.

    `variant`: the query model's file on the client ("device-int8", ...), or "server" to send the photos to
    `POST /v1/search/photo`. `required`: the pair counts in the verdict (else it is shown for diagnosis).
    """

    query: str
    gallery: str
    variant: str
    required: bool = True


@dataclass(frozen=True)
class VerifyConfig:
    """Where `concord verify-release` reads and writes, and how close the figures must be."""

    release: Path
    data: Path
    work: Path = DEFAULT_WORK
    out: Path = DEFAULT_OUT
    tolerance: float = TOLERANCE
    batch: int = 32
    threads: int | None = None
    progress: bool = True


def default_pairs(manifest: Manifest) -> list[Pair]:
    """newest edge (device file) -> oldest cloud, and newest cloud -> newest cloud (required); the newest edge's
    fp32 server file (when the release ships one) -> oldest cloud for diagnosis (what quantisation moves)."""
    from edge.bench.neardup import query_variant

    edge, old_cloud, new_cloud = manifest.newest("edge"), manifest.oldest("cloud").id, manifest.newest("cloud").id
    device = query_variant(edge)
    pairs = [Pair(edge.id, old_cloud, device), Pair(new_cloud, new_cloud, "server")]
    if device != "server" and edge.variants[device].file != edge.file:  # a slim release ships the device file only
        pairs.append(Pair(edge.id, old_cloud, "client-fp32", required=False))
    return pairs


def manifest_figure(manifest: Manifest, query: str, gallery: str, metric: str) -> float | None:
    """M(query, gallery)[metric] as recorded in the release (the query model's matrix first)."""
    from models.gate import figure

    return figure(manifest, manifest.model(query), query, gallery, metric)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="photo", disable=not enabled, smoothing=0.1)


def index_gallery(server: Any, folder: Path, names: list[str], labels: np.ndarray, batch: int,
                  progress: bool = True) -> dict[str, Any]:
    """Send the gallery photos the store lacks (by sha256) in batches, with metadata {"path", "label"}."""
    hashes = [hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    stored: set[str] = set()
    unique = list(first)
    for start in range(0, len(unique), LOOKUP_CHUNK):
        stored |= set(server.client.lookup(unique[start:start + LOOKUP_CHUNK]))
    todo = [i for h, i in first.items() if h not in stored]
    twins = [i for i, h in enumerate(hashes) if first[h] != i]
    begin = time.perf_counter()
    with _bar(len(todo), "indexing gallery", progress) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            server.client.add_photos([(names[i], (folder / names[i]).read_bytes()) for i in chunk],
                                     [{"path": names[i], "label": int(labels[i])} for i in chunk])
            bar.update(len(chunk))
    seconds = time.perf_counter() - begin
    return {"photos": len(names), "sent": len(todo), "already_stored": len(stored), "byte_identical_copies": len(twins),
            "byte_identical_with_other_label": sum(int(labels[i] != labels[first[hashes[i]]]) for i in twins),
            "seconds": round(seconds, 1), "photos_per_s": round(len(todo) / seconds, 2) if todo and seconds else None}


def hit_labels(result: SearchResult) -> list[int]:
    """The `label` metadata of a search's hits, best first (-2 for a hit without one)."""
    return [int(h.metadata.get("label", -2)) for h in result.hits]


def search_embeddings(server: Any, vectors: np.ndarray, model_id: str, k: int, progress: bool) -> list[list[int]]:
    """Search with client-made embeddings through the edge client (`POST /v1/search/embedding`)."""
    found = []
    with _bar(len(vectors), f"searching ({model_id})", progress) as bar:
        for vector in vectors:
            found.append(hit_labels(server.client.search_embedding(vector, model_id, k)))
            bar.update(1)
    return found


def search_photos(server: Any, paths: list[Path], k: int, progress: bool) -> list[list[int]]:
    """Search with the query photos themselves (`POST /v1/search/photo`: the server encodes them)."""
    found = []
    with _bar(len(paths), "searching (photos sent to the server)", progress) as bar:
        for path in paths:
            found.append(hit_labels(server.client.search_photo(path.name, path.read_bytes(), k)))
            bar.update(1)
    return found


def recall(found: list[list[int]], labels: np.ndarray, k: int) -> float | None:
    """Share of queries with a hit of their own class among the first k (distractors never count); None for
    no queries."""
    hits = [int(q) in h[:k] and q >= 0 for h, q in zip(found, labels, strict=True)]
    return float(np.mean(hits)) if hits else None


def figures(found: list[list[int]], labels: np.ndarray, old_classes: int) -> dict[str, Any]:
    """Recall@k overall and on old-class / new-class queries."""
    groups = {"all": np.ones(len(labels), dtype=bool), "old": labels < old_classes, "new": labels >= old_classes}
    out: dict[str, Any] = {}
    for group, mask in groups.items():
        subset = [f for f, keep in zip(found, mask, strict=True) if keep]
        out[group] = {"queries": int(mask.sum()), **{f"recall@{k}": recall(subset, labels[mask], k) for k in KS}}
    return out


def run_verify(config: VerifyConfig, pairs: list[Pair] | None = None) -> dict[str, Any]:
    """Index the gallery of every gallery model through its own server, search every pair, compare, write."""
    from models.benchmark import report
    from models.benchmark.caltech import NUM_OLD_CLASSES, load_split
    from models.release import Release
    from server.bench.driver import Server

    release = Release.load(config.release)
    manifest = release.manifest
    pairs = pairs or default_pairs(manifest)
    split = load_split(config.data)
    gallery_paths_digest = names_digest([str(split.image_dir.resolve()), *split.gallery])
    query_paths = [split.image_dir / q for q in split.queries]
    rows, stores = [], {}
    for gallery in dict.fromkeys(p.gallery for p in pairs):
        entry = manifest.model(gallery)
        store = config.work / f"store-{gallery}-{entry.sha256[:12]}-{gallery_paths_digest}"
        log = config.work / f"server-{gallery}.log"
        print(f"server with {gallery} active, store {store}", flush=True)
        with Server(release.folder, store, log, model=gallery, threads=config.threads) as server:
            active = server.client.ready()["active_model"]
            if active != gallery:
                raise RuntimeError(f"the store {store} indexes with {active!r}, not {gallery!r}; delete it to restart")
            indexing = index_gallery(server, split.image_dir, split.gallery, split.gallery_labels, config.batch,
                                     config.progress)
            stats = server.client.stats()
            if set(stats["vectors"]) - {gallery}:
                raise RuntimeError(f"the store {store} holds vectors of {sorted(stats['vectors'])}, not only {gallery}")
            stores[gallery] = {"store": str(store), "server_start_s": round(server.start_s, 2), **indexing,
                               "vectors": stats["vectors"]}
            print(f"gallery {gallery}: {stats['vectors_total']} vectors ({indexing['sent']} sent now)", flush=True)
            for pair in (p for p in pairs if p.gallery == gallery):
                found = _search_pair(server, release, pair, query_paths, split.queries, config)
                rows.append(_row(manifest, pair, figures(found, split.query_labels, NUM_OLD_CLASSES), config))
                print(_line(rows[-1]), flush=True)
    required = [r for r in rows if r["required"]]
    result: dict[str, Any] = {
        **report.header(), "release": report.shown_path(release.folder), "release_name": manifest.release,
        "protocol": {"data": str(split.image_dir.parent), "gallery": len(split.gallery),
                     "gallery_source": "train.txt with BACKGROUND_Google, label -1: never relevant",
                     "queries": len(split.queries), "query_source": "test.txt without BACKGROUND_Google",
                     "k": max(KS), "tolerance": config.tolerance, "path": "through a `concord serve` process: "
                     "POST /v1/photos, then POST /v1/search/embedding (client-encoded) or /v1/search/photo"},
        "stores": stores, "results": rows, "passed": bool(required) and all(r["passed"] for r in required),
    }
    result["written"] = [str(p) for p in report.write(config.out, STEM, result, markdown(result))]
    return result


def _search_pair(server: Any, release: Any, pair: Pair, query_paths: list[Path], names: list[str],
                 config: VerifyConfig) -> list[list[int]]:
    if pair.variant == "server":
        return search_photos(server, query_paths, max(KS), config.progress)
    variant = "server" if pair.variant == "client-fp32" else pair.variant
    encoder = release.encoder(pair.query, variant, threads=config.threads)
    sha = release.file(pair.query, variant).sha256
    vectors = cached(config.work, f"queries-{pair.query}-{variant}-{sha[:12]}-{names_digest(names)}",
                     lambda: encode_paths([encoder], query_paths, f"queries ({pair.query} {variant})")[0])
    return search_embeddings(server, vectors, pair.query, max(KS), config.progress)


def _row(manifest: Manifest, pair: Pair, measured: dict[str, Any], config: VerifyConfig) -> dict[str, Any]:
    recorded = {f"recall@{k}": manifest_figure(manifest, pair.query, pair.gallery, f"recall@{k}") for k in KS}
    mine, theirs = measured["all"]["recall@1"], recorded["recall@1"]
    difference = None if theirs is None else mine - theirs
    return {"query_model": pair.query, "gallery_model": pair.gallery, "query_file": pair.variant,
            "required": pair.required, "measured": measured, "manifest": recorded,
            "difference_recall@1": difference, "tolerance": config.tolerance,
            "passed": difference is not None and abs(difference) <= config.tolerance}


def _verdict(row: dict[str, Any]) -> str:
    return ("PASS" if row["passed"] else "FAIL") + ("" if row["required"] else " (diagnostic)")


def _line(row: dict[str, Any]) -> str:
    m = row["measured"]["all"]
    return (f"M({row['query_model']} [{row['query_file']}], {row['gallery_model']}) Recall@1 {m['recall@1']:.4f}, "
            f"manifest {fmt(row['manifest']['recall@1'], 4)}, difference {fmt(row['difference_recall@1'], 4)}: "
            f"{_verdict(row)}")


def markdown(result: dict[str, Any]) -> str:
    """The verification report as markdown."""
    from models.benchmark import report

    p = result["protocol"]
    rows = [[r["query_model"], r["query_file"], r["gallery_model"], fmt(r["measured"]["all"]["recall@1"], 4),
             fmt(r["manifest"]["recall@1"], 4), fmt(r["difference_recall@1"], 4),
             fmt(r["measured"]["all"]["recall@5"], 4),
             fmt(r["manifest"]["recall@5"], 4), fmt(r["measured"]["old"]["recall@1"], 4),
             fmt(r["measured"]["new"]["recall@1"], 4),
             _verdict(r)] for r in result["results"]]
    stores = [[g, str(s["photos"]), str(s["sent"]), str(s["already_stored"]), str(s["byte_identical_copies"]),
               str(s["byte_identical_with_other_label"]), str(s["photos_per_s"] or "-")]
              for g, s in result["stores"].items()]
    return (f"# Release verification: the shipped models reproduce their manifest's figures through the server\n\n"
            f"Release `{result['release_name']}` ({result['release']}). Gallery: {p['gallery']} photos "
            f"({p['gallery_source']}); queries: {p['queries']} ({p['query_source']}); data {p['data']}. "
            f"Path: {p['path']}. A pair passes when |measured - manifest| <= {p['tolerance']} on Recall@1.\n\n"
            + report.table(["query model", "query file", "gallery model", "Recall@1", "manifest", "difference",
                            "Recall@5", "manifest R@5", "R@1 old classes", "R@1 new classes", "verdict"], rows)
            + f"\n**{'PASS' if result['passed'] else 'FAIL'}** (required pairs).\n\nGallery stores (indexed through "
            f"`POST /v1/photos`):\n\n"
            + report.table(["gallery model", "photos", "sent this run", "already stored", "byte-identical copies",
                            "copies with another label", "photos/s"], stores)
            + "\nA byte-identical copy is stored once (its first listed path and label), as the server "
            "deduplicates by sha256.\n\n" + report.context_markdown(result))


def main(release: Path | None, data: Path | None, work: Path, out: Path, tolerance: float, batch: int,
         threads: int | None, progress: bool) -> int:
    """`concord verify-release`: 0 when every required pair matches its manifest figure, 1 otherwise."""

    from models.benchmark.caltech import data_root
    from server.settings import Settings

    config = VerifyConfig(release=release or Settings.from_env().release,
                          data=data or data_root(), work=work, out=out,
                          tolerance=tolerance, batch=batch, threads=threads, progress=progress)
    result = run_verify(config)
    print(f"{'PASS' if result['passed'] else 'FAIL'}; wrote {', '.join(result['written'])}")
    return 0 if result["passed"] else 1
