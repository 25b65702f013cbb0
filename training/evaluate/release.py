"""A release's own figures on the open-world set: the ONNX files as they ship (cloud server graphs, edge
device graphs, int8 where shipped) encode the `eval` photos, each querying all the others, judged by the
recipe's protocol restricted to the models the release holds. Its Caltech-101 figures are in its manifest
(`concord verify-release` re-measures them through the server). Given the release devices run now (`previous`),
the report adds, for every edge model whose device file changed, what renewing that file changes for its users."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edge.bench.neardup import query_variant
from models.benchmark.embeddings import cached, encode_paths, names_digest
from models.benchmark.metrics import evaluate_retrieval, flip_rates
from models.benchmark.open_world import NAME as OPEN_WORLD
from models.benchmark.open_world import OpenWorld, load_open_world
from models.benchmark.report import shown_path
from models.manifest import ModelEntry
from models.release import Release
from training.evaluate.figures import build_report
from training.evaluate.protocol import BackfillSpec, Labels, MixedSpec, ModelEmbeddings, Protocol
from training.evaluate.report import write_report

Curve = TypeVar("Curve", MixedSpec, BackfillSpec)


def release_protocol(protocol: Protocol, models: set[str]) -> Protocol:
    """`protocol` without the pairs that name a model outside `models` (a release ships no baselines)."""
    def held(*ids: str) -> bool:
        return set(ids) <= models

    def kept(spec: Curve | None) -> Curve | None:
        """A gallery curve the release can draw (every model it mixes), searched only by the release's models."""
        if spec is None or not held(*spec.generations):
            return None
        return dataclasses.replace(spec, query_models=tuple(m for m in spec.query_models if m in models))

    return dataclasses.replace(
        protocol,
        upgrades=tuple(u for u in protocol.upgrades if held(u.new, u.replaced, *u.galleries)),
        cross_device=tuple(d for d in protocol.cross_device if held(d.edge, d.cloud)),
        tax=protocol.tax if protocol.tax and held(protocol.tax.independent, protocol.tax.compatible) else None,
        flips=tuple(f for f in protocol.flips if held(f.a, f.b, f.gallery)),
        mixed=kept(protocol.mixed), chain_mixed=kept(protocol.chain_mixed),
        backfill=kept(protocol.backfill),
        matrix=tuple(p for p in protocol.matrix if held(*p)))


def query_vectors(release: Release, entry: ModelEntry, world: OpenWorld, cache: Path) -> np.ndarray:
    """The `eval` photos encoded by the file `entry`'s model queries with (cached by that file's sha256)."""
    variant = query_variant(entry)
    key = f"{entry.id}-{release.file(entry.id, variant).sha256[:16]}-{names_digest(world.eval.paths)}"
    photos = [world.image_dir / p for p in world.eval.paths]
    return cached(cache, key, lambda: encode_paths([release.encoder(entry.id, variant)], photos,
                                                   f"{entry.id} {variant}")[0])


def renewals(release: Release, previous: Release, vectors: dict[str, np.ndarray], world: OpenWorld,
             cache: Path) -> list[dict[str, Any]]:
    """For each edge model whose query file differs in `previous`: Recall@1 of the old file and the new one on
    every cloud gallery of `release`, and the flips between them (what the model's users see change)."""
    rows = []
    clouds = [e.id for e in release.manifest.models.values() if e.role == "cloud"]
    labels, none = world.eval.labels, np.zeros(len(world.eval.labels), dtype=bool)
    for entry in release.manifest.models.values():
        old = previous.manifest.models.get(entry.id)
        if entry.role != "edge" or old is None:
            continue
        old_sha = previous.file(entry.id, query_variant(old)).sha256
        if old_sha == release.file(entry.id, query_variant(entry)).sha256:
            continue
        old_vectors = query_vectors(previous, old, world, cache)
        for cloud in clouds:
            hits_old, hits_new = (evaluate_retrieval(q, vectors[cloud], labels, labels, none, exclude_self=True)
                                  .hits_at_1 for q in (old_vectors, vectors[entry.id]))
            nfr, pfr = flip_rates(hits_old, hits_new)
            rows.append({"model": entry.id, "gallery": cloud, "previous_sha256": old_sha,
                         "recall@1_previous": float(hits_old.mean()), "recall@1": float(hits_new.mean()),
                         "nfr": nfr, "pfr": pfr})
    return rows


def evaluate_release(folder: Path, protocol: Protocol, out: Path, cache: Path, open_root: Path | None = None,
                     previous: Path | None = None) -> dict[str, Path]:
    """Encode the open-world `eval` photos with every model of the release at `folder` and write the report."""
    release = Release.load(folder)
    world = load_open_world(open_root)
    vectors, entries = {}, []
    for entry in sorted(release.manifest.models.values(), key=lambda e: (e.version, e.role, e.id)):
        vectors[entry.id] = query_vectors(release, entry, world, cache)
        entries.append(ModelEmbeddings(entry.id, entry.role, entry.version, vectors[entry.id],
                                       vectors[entry.id] if entry.role == "cloud" else None))
    labels = world.eval.labels
    report = build_report(entries, Labels(labels, labels, np.zeros(len(labels), dtype=bool), exclude_self=True),
                          release_protocol(protocol, set(release.manifest.models)), name=OPEN_WORLD)
    report["release"] = release.manifest.release or shown_path(folder)
    if previous is not None:
        report["renewals"] = renewals(release, Release.load(previous), vectors, world, cache)
        report["previous_release"] = shown_path(previous)
    return write_report(report, out, OPEN_WORLD)
