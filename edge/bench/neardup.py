"""`concord neardup`: does a device find the ORIGINAL of a near-duplicate photo in the cloud gallery?

Gallery: every Caltech-101 `test.txt` photo (BACKGROUND_Google included, about 3,049), encoded by the oldest
cloud model of the release (cloud-v1) with its server file. Queries: for a fixed-seed sample of gallery photos,
a near-duplicate (cropped to >= 80% of each side, resized 0.5-0.9x, re-encoded as JPEG at quality 50-70),
encoded on the device side by each query model (edge models with their device file). A query scores at k when
its original (or a byte-identical copy of it) is among the k nearest gallery photos.

Every query model is scored in both matches (`models.match`): `duplicate`, the query re-weighted so that the
space's photo FINGERPRINT (a colour-layout descriptor every model computes from the pixels inside its graph,
the same for every model) counts as much as the semantic part, and `similar`, the query as the model made it
(essentially semantic: what a plain search does). One ablation row scores the fingerprint parts alone, which
shows how much of the result is the pixels and how much the models. The target is the newest edge model in
`duplicate`; a release whose space has no fingerprint is scored and judged in `similar` (and says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.transforms import Transform, near_duplicate
from models.manifest import ModelEntry, Space
from models.match import parts, query_vectors

STEM = "neardup"
DEFAULT_OUT = Path("reports/neardup")
DEFAULT_CACHE = Path("cache/neardup")
TARGET = 0.95
"""Recall@1 the newest edge model must reach against the gallery model (in duplicate match, when it exists)."""
KS = (1, 5)
ALONE = "fingerprint alone"
"""The ablation row's match: only the fingerprint parts of query and gallery vectors are compared."""
MATCH_MEANING = {
    "duplicate": "the query re-weighted (models.match.query_vectors) so that its photo fingerprint counts as much "
                 "as its semantic part against the stored vectors: how a search for copies of a photo runs",
    "similar": "the query as the model made it (fingerprint weight small, so essentially semantic): how a plain "
               "search runs",
    ALONE: "the unit fingerprint parts of query and gallery vectors alone, semantic parts ignored (ablation: how "
           "much of the duplicate result is the pixel fingerprint rather than the models)",
}


def query_variant(entry: ModelEntry) -> str:
    """The file a query model runs: an edge model its device file (int8 if shipped), a cloud model its server file."""
    from edge.choice import device_variant

    return device_variant(entry) if entry.role == "edge" else "server"


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


@dataclass(frozen=True)
class Judge:
    """Scores query vectors against one gallery in a given match (through `scores`, the one scoring function)."""

    gallery: np.ndarray
    originals: np.ndarray
    twins: list[set[int]]
    names: list[str]

    def row(self, match: str, found: np.ndarray, control: np.ndarray, space: Space) -> dict[str, Any]:
        """One report row: the near-duplicates' scores in `match`, misses that land in the original's class, and
        the control (the untransformed originals); a row saying why when the space has no fingerprint."""
        if space.fingerprint is None and match != "similar":
            return {"match": match, "available": False,
                    "reason": f"space {space.id!r} has no photo fingerprint (an older release): only similar runs"}
        gallery = parts(self.gallery, space)[1] if match == ALONE else self.gallery
        scored = scores(self._queries(match, found, space), gallery, self.originals, self.twins)
        kept = scores(self._queries(match, control, space), gallery, self.originals, self.twins)
        same_class = sum(self.names[t].split("/")[0] == self.names[i].split("/")[0]
                         for t, i, hit in zip(scored["top1"], self.originals, scored["hit@1"], strict=True) if not hit)
        return {"match": match, "available": True, **scored, "misses@1_in_the_original_class": same_class,
                "control": {k: kept[k] for k in ("recall@1", "recall@5", "mean_cosine_to_original")}}

    @staticmethod
    def _queries(match: str, vectors: np.ndarray, space: Space) -> np.ndarray:
        return parts(vectors, space)[1] if match == ALONE else query_vectors(vectors, space, match)


def run_neardup(config: NeardupConfig) -> dict[str, Any]:
    """Encode the gallery (cached), make and encode the near-duplicates, score every query model, write reports."""
    from models.benchmark import report
    from models.benchmark.caltech import image_dir, read_list
    from models.benchmark.embeddings import cached, encode_paths, names_digest
    from models.preprocess import load_image
    from models.release import Release

    release = Release.load(config.release)
    manifest = release.manifest
    new_edge = manifest.newest("edge").id
    gallery_id = config.gallery_model or manifest.oldest("cloud").id
    gallery_entry = manifest.model(gallery_id)
    folder, names = image_dir(config.data), read_list(config.data, "test.txt", keep_background=True)
    paths = [folder / n for n in names]
    if config.queries > len(paths):
        raise ValueError(f"{config.queries} queries asked for, but the gallery holds only {len(paths)} photos")
    digest = names_digest(names)
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
    query_ids = list(dict.fromkeys((new_edge, manifest.oldest("edge").id, manifest.newest("cloud").id, gallery_id)))
    twins = [by_hash[hashes[i]] for i in picks]
    space = manifest.spaces[gallery_entry.space]
    headline_match = "duplicate" if space.fingerprint else "similar"
    judge = Judge(np.asarray(gallery, dtype=np.float32), picks, twins, names)
    rows, alone = [], None
    for model_id in query_ids:
        variant = query_variant(manifest.model(model_id))
        print(f"  encoding {len(images)} near-duplicates with {model_id} ({variant})", flush=True)
        encoder = release.encoder(model_id, variant, threads=config.threads)
        found = np.asarray(encoder.encode_images(images), dtype=np.float32)
        control = np.asarray(encoder.encode_images(originals), dtype=np.float32)
        base = {"query_model": model_id, "variant": variant, "gallery_model": gallery_id}
        rows += [{**base, **judge.row(match, found, control, space)} for match in ("duplicate", "similar")]
        if model_id == new_edge:
            alone = {**base, **judge.row(ALONE, found, control, space)}
    rows += [alone] if alone else []
    headline = next(r for r in rows if r["query_model"] == new_edge and r["match"] == headline_match)
    result: dict[str, Any] = {
        **report.header(), "release": report.shown_path(release.folder), "release_name": manifest.release,
        "protocol": {"gallery": len(paths), "gallery_source": f"{config.data}/test.txt with BACKGROUND_Google",
                     "gallery_model": gallery_id, "queries": config.queries, "seed": config.seed,
                     "transform": {**asdict(config.transform), "description": config.transform.describe()},
                     "byte_identical_originals": sum(len(t) > 1 for t in twins),
                     "hit": "the original (or a byte-identical copy) is among the k nearest gallery photos",
                     "control": "the same queries without any transformation: the original photo itself, encoded by "
                                "the query model (separates the query model's drift from the transformations')",
                     "space": space.id, "fingerprint": space.to_dict().get("fingerprint"),
                     "matches": {m: MATCH_MEANING[m] for m in ("duplicate", "similar", ALONE)}},
        "results": [{k: v for k, v in row.items() if k not in ("top1", "hit@1")} for row in rows],
        "target": {"query_model": headline["query_model"], "gallery_model": gallery_id, "match": headline_match,
                   "metric": "recall@1", "threshold": TARGET, "measured": headline["recall@1"],
                   "passed": headline["recall@1"] >= TARGET},
        "queries": [{"photo": names[i], **params,
                     **{f"{r['query_model']} {r['match']}": {"top1": names[r["top1"][j]], "hit": r["hit@1"][j]}
                        for r in rows if r["available"]}}
                    for j, (i, (_, params)) in enumerate(zip(picks, made, strict=True))],
    }
    result["written"] = [str(p) for p in report.write(config.out, STEM, result, markdown(result))]
    return result


def markdown(result: dict[str, Any]) -> str:
    """The near-duplicate report as markdown."""
    from models.benchmark import report

    p, t = result["protocol"], result["target"]
    rows = [_markdown_row(r) for r in result["results"]]
    verdict = "PASS" if t["passed"] else "FAIL"
    fingerprint = p.get("fingerprint")
    about = (f"The space `{p['space']}` carries a photo fingerprint ({fingerprint['kind']}, the last "
             f"{fingerprint['dims']} components, weight {fingerprint['weight']:g}; duplicate weight "
             f"{fingerprint['duplicate_weight']:g}): a colour-layout descriptor that every model computes from the "
             f"pixels inside its ONNX graph, the same for every model, appended to its semantic embedding."
             if fingerprint else
             f"The space `{p['space']}` carries no photo fingerprint (an older release): only the `similar` match "
             f"can run, and the target is judged on it.")
    matches = "".join(f"- `{m}`: {meaning}.\n" for m, meaning in p["matches"].items())
    return (f"# Near-duplicate search: does the device find the original?\n\n"
            f"Gallery: {p['gallery']} photos ({p['gallery_source']}) encoded by `{p['gallery_model']}`. "
            f"Queries: {p['queries']} gallery photos (seed {p['seed']}), each turned into a near-duplicate: "
            f"{p['transform']['description']}; then encoded by the query model. A hit: {p['hit']}.\n\n"
            f"{about}\n\nMatches (column `match`):\n{matches}\n"
            + report.table(["query model", "file", "gallery model", "match", "Recall@1", "Recall@5",
                            "misses@1 (top hit of the original's class)", "median rank", "mean score of the original",
                            "control R@1", "control R@5"], rows)
            + f"\nControl: {p['control']}. The score is the inner product of the (re-weighted) query and the gallery "
              f"vector; in the `{ALONE}` row, the cosine of the two fingerprints.\n"
            + f"\nTarget: Recall@1 of `{t['query_model']}` -> `{t['gallery_model']}` in `{t['match']}` match >= "
            f"{t['threshold']}: measured {t['measured']:.4f}, **{verdict}**.\n\n"
            f"The per-query parameters and top hits are in `{STEM}.json`.\n\n" + report.context_markdown(result))


def _markdown_row(r: dict[str, Any]) -> list[str]:
    """A results row as table cells; a match the space cannot run says why in its figure cells."""
    head = [r["query_model"], r["variant"], r["gallery_model"], r["match"]]
    if not r["available"]:
        return head + [r["reason"]] + ["-"] * 6
    return [*head, f"{r['recall@1']:.4f}", f"{r['recall@5']:.4f}",
            f"{r['misses@1']} ({r['misses@1_in_the_original_class']})", f"{r['median_rank']:g}",
            f"{r['mean_cosine_to_original']:.3f}", f"{r['control']['recall@1']:.4f}", f"{r['control']['recall@5']:.4f}"]


def main(release: Path | None, data: Path | None, out: Path, cache: Path, queries: int, seed: int,
         gallery_model: str | None, threads: int | None) -> int:
    """`concord neardup`: 0 when the newest edge model reaches the Recall@1 target (in duplicate match when the
    space has a fingerprint), 1 otherwise."""

    from models.benchmark.caltech import data_root
    from server.settings import Settings

    config = NeardupConfig(release=release or Settings.from_env().release,
                           data=data or data_root(), out=out, cache=cache,
                           queries=queries, seed=seed, gallery_model=gallery_model, threads=threads)
    result = run_neardup(config)
    for row in result["results"]:
        figures = (f"Recall@1 {row['recall@1']:.4f}, Recall@5 {row['recall@5']:.4f}" if row["available"]
                   else row["reason"])
        print(f"{row['query_model']} ({row['variant']}) -> {row['gallery_model']}, {row['match']}: {figures}")
    target = result["target"]
    print(f"target: {target['query_model']} in {target['match']} match, Recall@1 >= {target['threshold']}: "
          f"{'PASS' if target['passed'] else 'FAIL'}; wrote {', '.join(result['written'])}")
    return 0 if target["passed"] else 1
