"""`concord neardup`: does a device find the ORIGINAL of a near-duplicate photo in the cloud gallery?

Gallery: every Caltech-101 `test.txt` photo (BACKGROUND_Google included, about 3,049), encoded by the oldest
cloud model of the release (cloud-v1) with its server file. Queries: for a fixed-seed sample of gallery photos,
a near-duplicate (cropped to >= 80% of each side, resized 0.5-0.9x, re-encoded as JPEG at quality 50-70),
encoded on the device side by each query model (edge models with their device file). A query scores at k when
its original (or a byte-identical copy of it) is among the k nearest gallery photos.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest, ModelEntry
from models.neardup import Transform, near_duplicate

STEM = "neardup"
DEFAULT_OUT = Path("reports/neardup")
DEFAULT_CACHE = Path("cache/neardup")
TARGET = 0.95
"""Recall@1 the newest edge model must reach against the gallery model."""
KS = (1, 5)


@dataclass(frozen=True)
class Chain:
    """The release's models in order: oldest and newest cloud, oldest and newest edge."""

    old_cloud: str
    new_cloud: str
    old_edge: str
    new_edge: str


def chain(manifest: Manifest) -> Chain:
    """Oldest/newest cloud and edge models by version (a release must hold at least one of each)."""
    found = {}
    for role in ("cloud", "edge"):
        entries = sorted((e for e in manifest.models.values() if e.role == role), key=lambda e: (e.version, e.id))
        if not entries:
            raise ValueError(f"the release holds no {role} model; it holds {sorted(manifest.models)}")
        found[role] = entries
    return Chain(found["cloud"][0].id, found["cloud"][-1].id, found["edge"][0].id, found["edge"][-1].id)


def query_variant(entry: ModelEntry) -> str:
    """The file a query model runs: an edge model its device file (int8 if shipped), a cloud model its server file."""
    from edge.choice import device_variant

    return device_variant(entry) if entry.role == "edge" else "server"


def list_split(data: Path, name: str, background: bool) -> tuple[Path, list[str]]:
    """Photo folder and the relative paths of Caltech-101's `name` list (train.txt / test.txt)."""
    from edge.accuracy import BACKGROUND

    folder = data / "101_ObjectCategories"
    listing = data / name
    if not listing.is_file() or not folder.is_dir():
        raise FileNotFoundError(f"Caltech-101 not found at {data} (expected {listing} and {folder}); pass --data "
                                f"or set CONCORD_DATA")
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return folder, [p for p in lines if background or not p.startswith(BACKGROUND + "/")]


@dataclass(frozen=True)
class NeardupConfig:
    """What `concord neardup` measures and where it reads and writes."""

    release: Path
    data: Path
    out: Path = DEFAULT_OUT
    cache: Path = DEFAULT_CACHE
    queries: int = 500
    seed: int = 0
    transform: Transform = field(default_factory=Transform)
    gallery_model: str | None = None
    """Default: the oldest cloud model."""
    threads: int | None = None


def file_hashes(paths: list[Path]) -> list[str]:
    """sha256 of every file (a byte-identical copy of the original counts as the original)."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def scores(queries: np.ndarray, gallery: np.ndarray, originals: np.ndarray, twins: list[set[int]]
           ) -> dict[str, Any]:
    """Recall@1/@5 (the original or a byte twin among the k nearest), the rank of the original, cosine to it."""
    sims = queries @ gallery.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :max(KS)]
    found = {k: np.array([bool(set(order[i, :k].tolist()) & twins[i]) for i in range(len(queries))]) for k in KS}
    own = sims[np.arange(len(queries)), originals]
    rank = (sims > own[:, None]).sum(axis=1) + 1
    return {**{f"recall@{k}": float(found[k].mean()) for k in KS},
            "misses@1": int((~found[1]).sum()), "median_rank": float(np.median(rank)),
            "mean_cosine_to_original": float(own.mean()), "min_cosine_to_original": float(own.min()),
            "top1": order[:, 0].tolist(), "hit@1": found[1].tolist()}


def run_neardup(config: NeardupConfig) -> dict[str, Any]:
    """Encode the gallery (cached), make and encode the near-duplicates, score every query model, write reports."""
    from edge import report
    from edge.accuracy import cached, encode_paths
    from models.preprocess import load_image
    from models.release import Release

    release = Release.load(config.release)
    manifest = release.manifest
    order = chain(manifest)
    gallery_id = config.gallery_model or order.old_cloud
    gallery_entry = manifest.model(gallery_id)
    folder, names = list_split(config.data, "test.txt", background=True)
    paths = [folder / n for n in names]
    if config.queries > len(paths):
        raise ValueError(f"{config.queries} queries asked for, but the gallery holds only {len(paths)} photos")
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    gallery_encoder = release.encoder(gallery_id, "server", threads=config.threads)
    gallery = cached(config.cache, f"gallery-{gallery_id}-{gallery_entry.sha256[:16]}-{digest}",
                     lambda: encode_paths([gallery_encoder], paths, f"gallery ({gallery_id}, {len(paths)} photos)")[0])
    hashes = file_hashes(paths)
    by_hash: dict[str, set[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, set()).add(i)
    rng = np.random.default_rng(config.seed)
    picks = np.sort(rng.choice(len(paths), size=config.queries, replace=False))
    originals = [load_image(paths[i]) for i in picks]
    made = [near_duplicate(image, rng, config.transform) for image in originals]
    images = [load_image(data) for data, _ in made]
    query_ids = [m for m in dict.fromkeys((order.new_edge, order.old_edge, order.new_cloud, gallery_id))]
    twins = [by_hash[hashes[i]] for i in picks]
    rows = []
    for model_id in query_ids:
        variant = query_variant(manifest.model(model_id))
        print(f"  encoding {len(images)} near-duplicates with {model_id} ({variant})", flush=True)
        encoder = release.encoder(model_id, variant, threads=config.threads)
        found = scores(np.asarray(encoder.encode_images(images), dtype=np.float32), gallery, picks, twins)
        control = scores(np.asarray(encoder.encode_images(originals), dtype=np.float32), gallery, picks, twins)
        same_class = sum(names[t].split("/")[0] == names[i].split("/")[0]
                         for t, i, hit in zip(found["top1"], picks, found["hit@1"], strict=True) if not hit)
        rows.append({"query_model": model_id, "variant": variant, "gallery_model": gallery_id, **found,
                     "misses@1_in_the_original_class": same_class,
                     "control": {k: control[k] for k in ("recall@1", "recall@5", "mean_cosine_to_original")}})
    headline = rows[0]
    result: dict[str, Any] = {
        **report.header(), "release": str(release.folder), "release_name": manifest.release,
        "protocol": {"gallery": len(paths), "gallery_source": f"{config.data}/test.txt with BACKGROUND_Google",
                     "gallery_model": gallery_id, "queries": config.queries, "seed": config.seed,
                     "transform": {**asdict(config.transform), "description": config.transform.describe()},
                     "byte_identical_originals": sum(len(t) > 1 for t in twins),
                     "hit": "the original (or a byte-identical copy) is among the k nearest gallery photos",
                     "control": "the same queries without any transformation: the original photo itself, encoded by "
                                "the query model (separates the query model's drift from the transformations')"},
        "results": [{k: v for k, v in row.items() if k not in ("top1", "hit@1")} for row in rows],
        "target": {"query_model": headline["query_model"], "gallery_model": gallery_id, "metric": "recall@1",
                   "threshold": TARGET, "measured": headline["recall@1"],
                   "passed": headline["recall@1"] >= TARGET},
        "queries": [{"photo": names[i], **params, **{r["query_model"]: {"top1": names[r["top1"][j]],
                                                                        "hit": r["hit@1"][j]} for r in rows}}
                    for j, (i, (_, params)) in enumerate(zip(picks, made, strict=True))],
    }
    result["written"] = [str(p) for p in report.write(config.out, STEM, result, markdown(result))]
    return result


def markdown(result: dict[str, Any]) -> str:
    """The near-duplicate report as markdown."""
    from edge import report

    p, t = result["protocol"], result["target"]
    rows = [[r["query_model"], r["variant"], r["gallery_model"], f"{r['recall@1']:.4f}", f"{r['recall@5']:.4f}",
             f"{r['misses@1']} ({r['misses@1_in_the_original_class']})", f"{r['median_rank']:g}",
             f"{r['mean_cosine_to_original']:.3f}",
             f"{r['control']['recall@1']:.4f}", f"{r['control']['recall@5']:.4f}"]
            for r in result["results"]]
    verdict = "PASS" if t["passed"] else "FAIL"
    return (f"# Near-duplicate search: does the device find the original?\n\n"
            f"Gallery: {p['gallery']} photos ({p['gallery_source']}) encoded by `{p['gallery_model']}`. "
            f"Queries: {p['queries']} gallery photos (seed {p['seed']}), each turned into a near-duplicate: "
            f"{p['transform']['description']}; then encoded by the query model. A hit: {p['hit']}.\n\n"
            + report.table(["query model", "file", "gallery model", "Recall@1", "Recall@5",
                            "misses@1 (top hit of the original's class)", "median rank", "mean cosine to original",
                            "control R@1", "control R@5"], rows)
            + f"\nControl: {p['control']}.\n"
            + f"\nTarget: Recall@1 of `{t['query_model']}` -> `{t['gallery_model']}` >= {t['threshold']}: "
            f"measured {t['measured']:.4f}, **{verdict}**.\n\n"
            f"The per-query parameters and top hits are in `{STEM}.json`.\n\n" + report.context_markdown(result))


def main(release: Path | None, data: Path | None, out: Path, cache: Path, queries: int, seed: int,
         gallery_model: str | None, threads: int | None) -> int:
    """`concord neardup`: 0 when the newest edge model reaches the Recall@1 target, 1 otherwise."""
    import os

    from edge.accuracy import DEFAULT_DATA
    from server.settings import Settings

    config = NeardupConfig(release=release or Settings.from_env().release,
                           data=data or Path(os.environ.get("CONCORD_DATA") or DEFAULT_DATA), out=out, cache=cache,
                           queries=queries, seed=seed, gallery_model=gallery_model, threads=threads)
    result = run_neardup(config)
    for row in result["results"]:
        print(f"{row['query_model']} ({row['variant']}) -> {row['gallery_model']}: Recall@1 {row['recall@1']:.4f}, "
              f"Recall@5 {row['recall@5']:.4f}")
    target = result["target"]
    print(f"target Recall@1 >= {target['threshold']}: {'PASS' if target['passed'] else 'FAIL'}; wrote "
          f"{', '.join(result['written'])}")
    return 0 if target["passed"] else 1
