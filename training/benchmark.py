"""The benchmark, top to bottom: cache trunk features, train every model of the recipe in order, embed
the gallery and the queries with each, and evaluate. Every step is resumable: finished work is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.benchmark.caltech import Benchmark, PhotoSet, load_benchmark
from training.cache import compute_features, feature_matrix, fingerprint_features
from training.evaluate import (
    DevicePair,
    FlipPair,
    Labels,
    MixedSpec,
    ModelEmbeddings,
    Protocol,
    TaxPair,
    UpgradePair,
    build_report,
    write_report,
)
from training.trainer import TrainConfig, TrainData, embed_features, encoder_from_checkpoint, load_checkpoint, train

RECIPE = ("cloud-v1", "edge-v1", "cloud-v2", "edge-v2", "cloud-v2-independent", "cloud-v2-l2")
"""Training order: each model's references come before it."""


@dataclass(frozen=True)
class Paths:
    """Where the benchmark keeps its work: feature cache, checkpoints, reports."""

    cache: Path = Path("cache")
    runs: Path = Path("runs")
    reports: Path = Path("reports/benchmark")

    def checkpoint(self, model_id: str) -> Path:
        return self.runs / model_id / "checkpoint.pt"


def recipe_config(model_id: str) -> TrainConfig:
    """The shipped experiment config of a benchmark model (training/configs/<id>.toml)."""
    path = resources.files("training") / "configs" / f"{model_id}.toml"
    return TrainConfig.from_toml(str(path))


def features(bench: Benchmark, photos: PhotoSet, arch: str, resolution: int, views: list[str],
             cache: Path) -> torch.Tensor:
    """Trunk features [views, N, 1280] of `photos`, computed once and cached."""
    rows = []
    for view in views:
        table = compute_features(bench.image_dir, photos.paths, arch, resolution, view, cache)
        rows.append(torch.from_numpy(feature_matrix(table, photos.paths)))
    return torch.stack(rows)


def training_data(config: TrainConfig, bench: Benchmark, paths: Paths) -> TrainData:
    """Features of the config's training photos plus its frozen references' embeddings and classifiers."""
    photos = bench.gallery if config.photos == "gallery" else bench.training_set(config.num_classes)
    data = TrainData(features(bench, photos, config.arch, config.resolution, config.views, paths.cache),
                     torch.from_numpy(photos.labels))
    for ref in config.references:
        checkpoint = load_checkpoint(paths.checkpoint(ref))
        if not checkpoint.done:
            raise RuntimeError(f"{config.model_id} needs the finished model {ref}; train it first")
        encoder = encoder_from_checkpoint(checkpoint)
        ref_cfg = checkpoint.config
        ref_features = features(bench, photos, ref_cfg.arch, ref_cfg.resolution, config.views, paths.cache)
        data.references[ref] = torch.stack([embed_features(encoder, view) for view in ref_features])
        if checkpoint.classifier is not None:
            data.classifiers[ref] = checkpoint.classifier
    return data


def train_model(model_id: str, bench: Benchmark, paths: Paths, config: TrainConfig | None = None) -> Path:
    """Train one benchmark model (skipped when its checkpoint is finished); returns the checkpoint."""
    config = config or recipe_config(model_id)
    checkpoint = paths.checkpoint(config.model_id)
    if checkpoint.exists() and load_checkpoint(checkpoint).done:
        return checkpoint
    train(config, training_data(config, bench, paths), checkpoint)
    return checkpoint


@dataclass(frozen=True)
class Embedded:
    """One model's embeddings of the benchmark: queries always, gallery for cloud models."""

    config: TrainConfig
    queries: np.ndarray
    gallery: np.ndarray | None


def embed_model(model_id: str, bench: Benchmark, paths: Paths) -> Embedded:
    """Encode the queries (and, for a cloud model, the gallery) with a trained model."""
    checkpoint = load_checkpoint(paths.checkpoint(model_id))
    config = checkpoint.config
    encoder = encoder_from_checkpoint(checkpoint)

    def encode(photos: PhotoSet) -> np.ndarray:
        feats = features(bench, photos, config.arch, config.resolution, ["plain"], paths.cache)[0]
        embedding = embed_features(encoder, feats)
        if encoder.fingerprint is None:
            return embedding.numpy()
        raw = fingerprint_features(bench.image_dir, photos.paths, encoder.fingerprint, config.resolution, "plain",
                                   paths.cache)
        fingerprint = encoder.fingerprint.project(torch.from_numpy(feature_matrix(raw, photos.paths)))
        return encoder.fingerprint.combine(embedding, fingerprint).numpy()

    return Embedded(config, encode(bench.queries), encode(bench.gallery) if config.role == "cloud" else None)


def run(models: tuple[str, ...] = RECIPE, data_root: Path | None = None,
        paths: Paths | None = None) -> dict[str, Embedded]:
    """Train every model of the recipe in order (resumable) and return their benchmark embeddings."""
    paths = paths or Paths()
    bench = load_benchmark(data_root)
    for model_id in models:
        train_model(model_id, bench, paths)
    return {model_id: embed_model(model_id, bench, paths) for model_id in models}


def cache_recipe(models: tuple[str, ...], data_root: Path | None, paths: Paths) -> None:
    """Compute every trunk feature the recipe needs (all photos plain; training photos in each view)."""
    bench = load_benchmark(data_root)
    photos = PhotoSet(bench.all_paths(), np.zeros(len(bench.all_paths()), dtype=np.int64))
    for config in map(recipe_config, models):
        features(bench, photos, config.arch, config.resolution, ["plain"], paths.cache)
        training = bench.gallery if config.photos == "gallery" else bench.train
        features(bench, training, config.arch, config.resolution, config.views, paths.cache)


def recipe_protocol() -> Protocol:
    """What the benchmark judges: upgrades, cross-device pairs, the tax, flips and the mixed gallery."""
    old = ("cloud-v1",)
    return Protocol(
        upgrades=(UpgradePair("cloud-v2", "cloud-v1", old), UpgradePair("edge-v2", "edge-v1", old),
                  UpgradePair("cloud-v2-independent", "cloud-v1", old), UpgradePair("cloud-v2-l2", "cloud-v1", old)),
        cross_device=(DevicePair("edge-v1", "cloud-v1"), DevicePair("edge-v2", "cloud-v2")),
        tax=TaxPair("cloud-v2-independent", "cloud-v2"),
        flips=(FlipPair("cloud-v1", "cloud-v2", "cloud-v1"), FlipPair("edge-v1", "edge-v2", "cloud-v1")),
        mixed=MixedSpec("cloud-v1", "cloud-v2", ("cloud-v2", "edge-v2", "edge-v1")),
        matrix=(("edge-v1", "cloud-v2"),),
    )


def evaluate_recipe(models: tuple[str, ...], data_root: Path | None, paths: Paths,
                    train_missing: bool = False) -> dict[str, Path]:
    """Embed the benchmark with every model (training missing ones if asked) and write the report."""
    bench = load_benchmark(data_root)
    if train_missing:
        for model_id in models:
            train_model(model_id, bench, paths)
    embedded = {model_id: embed_model(model_id, bench, paths) for model_id in models}
    entries = [ModelEmbeddings(m, e.config.role, e.config.version, e.queries, e.gallery, e.config.group)
               for m, e in embedded.items()]
    labels = Labels(bench.queries.labels, bench.gallery.labels, bench.is_old_class(bench.queries.labels))
    report = build_report(entries, labels, recipe_protocol())
    save_embeddings(embedded, paths.reports / "embeddings")
    return write_report(report, paths.reports)


def save_embeddings(embedded: dict[str, Embedded], folder: Path) -> None:
    """Keep each model's benchmark embeddings (float16) for the search benchmarks and later checks."""
    folder.mkdir(parents=True, exist_ok=True)
    for model_id, e in embedded.items():
        arrays: dict[str, Any] = {"queries": e.queries.astype(np.float16)}
        if e.gallery is not None:
            arrays["gallery"] = e.gallery.astype(np.float16)
        np.savez_compressed(folder / f"{model_id}.npz", **arrays)
