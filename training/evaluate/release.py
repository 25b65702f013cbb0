"""A release's own figures on the open-world set: the ONNX files as they ship (cloud server graphs, edge
device graphs, int8 where shipped) encode the `eval` photos, each querying all the others, judged by the
recipe's protocol restricted to the models the release holds. Its Caltech-101 figures are in its manifest
(`concord verify-release` re-measures them through the server)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import numpy as np

from edge.bench.neardup import query_variant
from models.benchmark.embeddings import cached, encode_paths, names_digest
from models.benchmark.open_world import NAME as OPEN_WORLD
from models.benchmark.open_world import load_open_world
from models.benchmark.report import shown_path
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


def evaluate_release(folder: Path, protocol: Protocol, out: Path, cache: Path,
                     open_root: Path | None = None) -> dict[str, Path]:
    """Encode the open-world `eval` photos with every model of the release at `folder` and write the report."""
    release = Release.load(folder)
    world = load_open_world(open_root)
    photos = [world.image_dir / p for p in world.eval.paths]
    entries = []
    for entry in sorted(release.manifest.models.values(), key=lambda e: (e.version, e.role, e.id)):
        variant = query_variant(entry)
        key = f"{entry.id}-{release.file(entry.id, variant).sha256[:16]}-{names_digest(world.eval.paths)}"

        def encode(model_id: str = entry.id, variant: str = variant) -> np.ndarray:
            return encode_paths([release.encoder(model_id, variant)], photos, f"{model_id} {variant}")[0]

        vectors = cached(cache, key, encode)
        entries.append(ModelEmbeddings(entry.id, entry.role, entry.version, vectors,
                                       vectors if entry.role == "cloud" else None))
    labels = world.eval.labels
    report = build_report(entries, Labels(labels, labels, np.zeros(len(labels), dtype=bool), exclude_self=True),
                          release_protocol(protocol, set(release.manifest.models)), name=OPEN_WORLD)
    report["release"] = release.manifest.release or shown_path(folder)
    return write_report(report, out, OPEN_WORLD)
