"""The benchmark, top to bottom: cache trunk features, train every model of the recipe in order, embed
the gallery and the queries with each, and evaluate on both parts of the protocol: Caltech-101 and the
open-world set (tinyimagenet_open: every `eval` photo queries all the others; the frozen trunks' same-model
figures are the reference). Every step is resumable: finished work is kept.

Training photos (`TrainConfig.photos`, plus `pool`): Caltech-101's labelled training photos, or every
gallery photo (labels kept for the config's classes, the rest label-free), plus, with `pool`, the
open-world `pool` photos, label-free. `eval` photos never train anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.atomic import write_atomic
from models.benchmark.caltech import DISTRACTOR, Benchmark, PhotoSet, load_benchmark
from models.benchmark.metrics import evaluate_retrieval
from models.benchmark.open_world import NAME as OPEN_WORLD
from models.benchmark.open_world import OpenWorld, load_open_world
from models.manifest import BackfillScorer
from training.arch import arch_parts
from training.backfill import fit_scorer
from training.cache import compute_features, feature_matrix, fingerprint_features
from training.evaluate import (
    BackfillSpec,
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
from training.losses import UNLABELLED
from training.trainer import (
    TRUNK,
    Checkpoint,
    TrainConfig,
    TrainData,
    embed_features,
    encoder_from_checkpoint,
    load_checkpoint,
    train,
)

OPEN_WORLD_GAP = 0.10
"""Largest cross-device gap on the open-world set (64 px photos of categories no model trained on)."""
RECIPE = ("cloud-v1", "edge-v1", "cloud-v2", "edge-v2", "cloud-v3", "edge-v3", "cloud-v2-independent", "cloud-v2-l2")
"""Training order: each model's references come before it."""


@dataclass(frozen=True)
class Paths:
    """Where the benchmark keeps its work: feature cache, checkpoints, reports."""

    cache: Path = Path("cache")
    runs: Path = Path("runs")
    reports: Path = Path("reports/benchmark")

    def checkpoint(self, model_id: str) -> Path:
        return self.runs / model_id / "checkpoint.pt"

    @property
    def open_cache(self) -> Path:
        """The open-world photos' own cache folder, so their keys never meet Caltech's."""
        return self.cache / "open-world"


@dataclass(frozen=True)
class Source:
    """Photos of one dataset: where they lie and where their trunk features are cached."""

    image_dir: Path
    cache: Path
    photos: PhotoSet


def recipe_config(model_id: str) -> TrainConfig:
    """The shipped experiment config of a benchmark model (training/configs/<id>.toml)."""
    path = resources.files("training") / "configs" / f"{model_id}.toml"
    return TrainConfig.from_toml(str(path))


def source_features(sources: list[Source], arch: str, resolution: int, views: list[str]) -> torch.Tensor:
    """Trunk features [views, N, feature_dim(arch)] of the photos of every source in order, computed once per
    trunk and cached (joined trunks concatenate their trunks' cached features)."""
    rows = []
    for view in views:
        parts = [np.concatenate([feature_matrix(compute_features(s.image_dir, s.photos.paths, part, resolution, view,
                                                                 s.cache), s.photos.paths)
                                 for part in arch_parts(arch)], axis=1) for s in sources]
        rows.append(torch.from_numpy(np.concatenate(parts)))
    return torch.stack(rows)


def features(bench: Benchmark, photos: PhotoSet, arch: str, resolution: int, views: list[str],
             cache: Path) -> torch.Tensor:
    """Trunk features [views, N, feature_dim(arch)] of Caltech-101 `photos`, computed once and cached."""
    return source_features([Source(bench.image_dir, cache, photos)], arch, resolution, views)


def training_sources(config: TrainConfig, bench: Benchmark, world: OpenWorld | None, paths: Paths) -> list[Source]:
    """The config's training photos: Caltech-101's (labels kept for its classes, else label-free), then the pool."""
    if config.photos == "labelled":
        caltech = bench.training_set(config.num_classes)
    else:
        labels = bench.gallery.labels.copy()
        if config.photos == "gallery" or not (config.has_class_loss or config.focal_references):
            labels[:] = UNLABELLED
        labels[(labels == DISTRACTOR) | (labels >= config.num_classes)] = UNLABELLED
        caltech = PhotoSet(bench.gallery.paths, labels)
    sources = [Source(bench.image_dir, paths.cache, caltech)]
    if config.pool:
        if world is None:
            raise RuntimeError(f"{config.model_id} trains on the open-world pool photos: the open-world set is needed")
        unlabelled = np.full(len(world.pool), UNLABELLED, dtype=np.int64)
        sources.append(Source(world.image_dir, paths.open_cache, PhotoSet(world.pool.paths, unlabelled)))
    return sources


def training_data(config: TrainConfig, bench: Benchmark, paths: Paths, world: OpenWorld | None = None) -> TrainData:
    """Features of the config's training photos plus its frozen references' embeddings and classifiers (the
    reference `trunk` is the model's own frozen trunk features, centred on the training photos); a distil view's
    targets are those of the plain photo (`TrainConfig.target_views`)."""
    sources = training_sources(config, bench, world, paths)
    feats = source_features(sources, config.arch, config.resolution, config.views)
    labels = torch.from_numpy(np.concatenate([s.photos.labels for s in sources]))
    data = TrainData(feats, labels)
    if config.init == "parent":
        data.parent = encoder_from_checkpoint(finished_checkpoint(config.replaces, config, paths))
    targets = config.target_views
    for ref in config.references:
        if ref == TRUNK:
            data.references[ref] = (feats - feats.reshape(-1, feats.shape[-1]).mean(dim=0))[targets]
            continue
        checkpoint = finished_checkpoint(ref, config, paths)
        encoder = encoder_from_checkpoint(checkpoint)
        ref_cfg = checkpoint.config
        used = sorted(set(targets))  # a distil view's own vectors are never a target: not computed
        ref_features = source_features(sources, ref_cfg.arch, ref_cfg.resolution, [config.views[i] for i in used])
        embedded = torch.stack([embed_features(encoder, view) for view in ref_features])
        data.references[ref] = embedded[[used.index(t) for t in targets]]
        if checkpoint.classifier is not None:
            data.classifiers[ref] = checkpoint.classifier
    for ref in config.focal_references:
        data.right[ref] = retrieved_right(data.references[ref][0], labels)
    return data


def retrieved_right(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each labelled photo's nearest other labelled photo (cosine) has its label: the model's own
    leave-one-out top-1 on its training photos, which focal distillation keeps (label-free photos: False)."""
    right = torch.zeros(len(labels), dtype=torch.bool)
    keep = torch.nonzero(labels != UNLABELLED).squeeze(1)
    unit = torch.nn.functional.normalize(embeddings[keep], dim=-1)
    for start in range(0, len(keep), 2048):
        sims = unit[start:start + 2048] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -2.0
        nearest = keep[sims.argmax(dim=1)]
        right[keep[start:start + 2048]] = labels[nearest] == labels[keep[start:start + 2048]]
    return right


def finished_checkpoint(model_id: str, needed_by: TrainConfig, paths: Paths) -> Checkpoint:
    """The finished checkpoint of a model another one trains from; a clear error when it is not there yet."""
    checkpoint = paths.checkpoint(model_id)
    loaded = load_checkpoint(checkpoint) if checkpoint.exists() else None
    if loaded is None or not loaded.done:
        raise RuntimeError(f"{needed_by.model_id} needs the finished model {model_id}; train it first")
    return loaded


def train_model(model_id: str, bench: Benchmark, paths: Paths, config: TrainConfig | None = None,
                world: OpenWorld | None = None) -> Path:
    """Train one benchmark model (skipped when its checkpoint is finished); returns the checkpoint."""
    config = config or recipe_config(model_id)
    checkpoint = paths.checkpoint(config.model_id)
    if checkpoint.exists() and load_checkpoint(checkpoint).done:
        return checkpoint
    if config.pool and world is None:
        world = load_open_world()
    train(config, training_data(config, bench, paths, world), checkpoint)
    return checkpoint


@dataclass(frozen=True)
class Embedded:
    """One model's embeddings of a benchmark: queries always, gallery for cloud models."""

    config: TrainConfig
    queries: np.ndarray
    gallery: np.ndarray | None


def encode_source(checkpoint: Checkpoint, source: Source) -> np.ndarray:
    """A trained model's vectors (semantic part plus the space's fingerprint) of one source's photos."""
    config = checkpoint.config
    encoder = encoder_from_checkpoint(checkpoint)
    feats = source_features([source], config.arch, config.resolution, ["plain"])[0]
    embedding = embed_features(encoder, feats)
    if encoder.fingerprint is None:
        return embedding.numpy()
    raw = fingerprint_features(source.image_dir, source.photos.paths, encoder.fingerprint, config.resolution,
                               "plain", source.cache)
    fingerprint = encoder.fingerprint.project(torch.from_numpy(feature_matrix(raw, source.photos.paths)))
    return encoder.fingerprint.combine(embedding, fingerprint).numpy()


def embed_model(model_id: str, bench: Benchmark, paths: Paths) -> Embedded:
    """Encode the Caltech-101 queries (and, for a cloud model, the gallery) with a trained model."""
    checkpoint = load_checkpoint(paths.checkpoint(model_id))
    config = checkpoint.config
    queries = encode_source(checkpoint, Source(bench.image_dir, paths.cache, bench.queries))
    gallery = (encode_source(checkpoint, Source(bench.image_dir, paths.cache, bench.gallery))
               if config.role == "cloud" else None)
    return Embedded(config, queries, gallery)


def embed_open_world(model_id: str, world: OpenWorld, paths: Paths) -> Embedded:
    """Encode the open-world `eval` photos with a trained model: they are the queries and, for a cloud model,
    the gallery too (each query's own photo is left out when ranking)."""
    checkpoint = load_checkpoint(paths.checkpoint(model_id))
    config = checkpoint.config
    vectors = encode_source(checkpoint, Source(world.image_dir, paths.open_cache, world.eval))
    return Embedded(config, vectors, vectors if config.role == "cloud" else None)


def run(models: tuple[str, ...] = RECIPE, data_root: Path | None = None,
        paths: Paths | None = None) -> dict[str, Embedded]:
    """Train every model of the recipe in order (resumable) and return their benchmark embeddings."""
    paths = paths or Paths()
    bench = load_benchmark(data_root)
    for model_id in models:
        train_model(model_id, bench, paths)
    return {model_id: embed_model(model_id, bench, paths) for model_id in models}


def cache_recipe(models: tuple[str, ...], data_root: Path | None, paths: Paths, open_root: Path | None = None) -> None:
    """Compute every trunk feature the recipe needs: all photos plain, training photos in each view, and the
    open-world photos (eval plain, pool in each view)."""
    bench = load_benchmark(data_root)
    world = load_open_world(open_root)
    photos = PhotoSet(bench.all_paths(), np.zeros(len(bench.all_paths()), dtype=np.int64))
    for config in map(recipe_config, models):
        features(bench, photos, config.arch, config.resolution, ["plain"], paths.cache)
        training = bench.gallery if config.photos != "labelled" else bench.train
        features(bench, training, config.arch, config.resolution, config.views, paths.cache)
        source_features([Source(world.image_dir, paths.open_cache, world.eval)], config.arch, config.resolution,
                        ["plain"])
        source_features([Source(world.image_dir, paths.open_cache, world.pool)], config.arch, config.resolution,
                        config.views)


def recipe_protocol() -> Protocol:
    """What the benchmark judges: every upgrade of the chain on every older cloud gallery (v3 against both v2
    and v1), cross-device pairs, the tax, flips of every upgrade, and the two- and three-generation galleries."""
    v1, both = ("cloud-v1",), ("cloud-v1", "cloud-v2")
    queries = ("cloud-v3", "edge-v3", "cloud-v2", "edge-v2", "edge-v1", "cloud-v1")
    return Protocol(
        upgrades=(UpgradePair("cloud-v2", "cloud-v1", v1), UpgradePair("edge-v2", "edge-v1", v1),
                  UpgradePair("cloud-v3", "cloud-v2", both), UpgradePair("edge-v3", "edge-v2", both),
                  UpgradePair("cloud-v3", "cloud-v1", v1), UpgradePair("edge-v3", "edge-v1", v1),
                  UpgradePair("cloud-v2-independent", "cloud-v1", v1), UpgradePair("cloud-v2-l2", "cloud-v1", v1)),
        cross_device=(DevicePair("edge-v1", "cloud-v1"), DevicePair("edge-v2", "cloud-v2"),
                      DevicePair("edge-v3", "cloud-v3")),
        tax=TaxPair("cloud-v2-independent", "cloud-v2"),
        flips=(FlipPair("cloud-v1", "cloud-v2", "cloud-v1"), FlipPair("edge-v1", "edge-v2", "cloud-v1"),
               FlipPair("cloud-v2", "cloud-v3", "cloud-v2"), FlipPair("edge-v2", "edge-v3", "cloud-v2"),
               FlipPair("cloud-v2", "cloud-v3", "cloud-v1"), FlipPair("edge-v2", "edge-v3", "cloud-v1")),
        mixed=MixedSpec("cloud-v1", "cloud-v2", ("cloud-v2", "edge-v2", "edge-v1", "cloud-v1")),
        chain_mixed=MixedSpec("cloud-v2", "cloud-v3", queries, oldest="cloud-v1", oldest_share=0.5),
        matrix=(("edge-v1", "cloud-v2"), ("cloud-v1", "cloud-v2")),
    )


def open_world_protocol() -> Protocol:
    """The Caltech protocol, with the open-world edge gap limit (0.10)."""
    return dataclasses.replace(recipe_protocol(), gap_threshold=OPEN_WORLD_GAP)


def trunk_reference(models: tuple[str, ...], world: OpenWorld, paths: Paths,
                    embedded: dict[str, Embedded]) -> list[dict[str, Any]]:
    """Same-model figures on the open-world set: each frozen trunk of the recipe (pooled features), and each
    trained model searching a gallery it indexed itself beside its frozen trunk's figure (the reference)."""
    labels = world.eval.labels
    none = np.zeros(len(labels), dtype=bool)
    rows, trunks = [], {}
    for config in map(recipe_config, models):
        key = f"{config.arch}@{config.resolution}"
        if key in trunks:
            continue
        feats = source_features([Source(world.image_dir, paths.open_cache, world.eval)], config.arch,
                                config.resolution, ["plain"])[0].numpy()
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        trunks[key] = evaluate_retrieval(feats, feats, labels, labels, none, exclude_self=True).overall.to_dict()
        rows.append({"model": f"frozen {key}", "trunk": key, "trained": False, **trunks[key]})
    for model_id, e in embedded.items():
        key = f"{e.config.arch}@{e.config.resolution}"
        own = evaluate_retrieval(e.queries, e.queries, labels, labels, none, exclude_self=True).overall.to_dict()
        rows.append({"model": model_id, "trunk": key, "trained": True, **own,
                     "trunk_recall@1": trunks[key]["recall@1"],
                     "vs_trunk": own["recall@1"] - trunks[key]["recall@1"]})
    return rows


def fit_backfill(chain: MixedSpec, world: OpenWorld, paths: Paths) -> dict[str, Any]:
    """Fit the backfill scorers of the three-generation gallery's newest model, one per older model it holds, on
    the open-world pool photos (label-free, never a benchmark gallery), kept in RUNS/<model>/backfill.json for the
    release."""
    pool = Source(world.image_dir, paths.open_cache, world.pool)
    new = encode_source(load_checkpoint(paths.checkpoint(chain.new_gallery)), pool)
    fitted = {}
    for old in chain.generations[:-1]:
        scorer, rho = fit_scorer(encode_source(load_checkpoint(paths.checkpoint(old)), pool), new)
        fitted[old] = {**scorer.to_dict(), "spearman_on_pool": rho}
    write_atomic(paths.runs / chain.new_gallery / "backfill.json", json.dumps(fitted).encode())
    return fitted


def backfill_spec(fitted: dict[str, Any], embedded: dict[str, Embedded], chain: MixedSpec) -> BackfillSpec:
    """The backfill judged: the three-generation gallery `chain` before its newest model took any photo (its
    oldest and old models' vectors) re-encoded by that model, each photo ordered by its own old model's scorer."""
    start = dataclasses.replace(chain, shares=(0.0,))
    score = {m: BackfillScorer.from_dict(fitted[m]).score(vectors)[:, None]
             for m in start.generations[:-1] if (vectors := embedded[m].gallery) is not None}
    priority = start.old_mix(score)  # each photo scored by the old model that holds it in the gallery
    return BackfillSpec(start, priority[:, 0], (start.new_gallery, "edge-v3"))


def evaluate_recipe(models: tuple[str, ...], data_root: Path | None, paths: Paths,
                    train_missing: bool = False, open_root: Path | None = None) -> dict[str, Path]:
    """Embed both benchmarks with every model (training missing ones if asked) and write both reports."""
    bench = load_benchmark(data_root)
    world = load_open_world(open_root)
    if train_missing:
        for model_id in models:
            train_model(model_id, bench, paths, world=world)
    embedded = {model_id: embed_model(model_id, bench, paths) for model_id in models}
    protocol = recipe_protocol()
    chain = protocol.chain_mixed
    assert chain is not None, "the recipe judges a three-generation gallery"
    fitted = fit_backfill(chain, world, paths)
    labels = Labels(bench.queries.labels, bench.gallery.labels, bench.is_old_class(bench.queries.labels))
    protocol = dataclasses.replace(protocol, backfill=backfill_spec(fitted, embedded, chain))
    report = build_report(_entries(embedded), labels, protocol)
    save_embeddings(embedded, paths.reports / "embeddings")
    written = write_report(report, paths.reports)
    opened = {model_id: embed_open_world(model_id, world, paths) for model_id in models}
    none = np.zeros(len(world.eval), dtype=bool)
    open_labels = Labels(world.eval.labels, world.eval.labels, none, exclude_self=True)
    open_protocol = dataclasses.replace(open_world_protocol(),
                                        backfill=backfill_spec(fitted, opened, chain))
    open_report = build_report(_entries(opened), open_labels, open_protocol, name=OPEN_WORLD)
    open_report["reference"] = trunk_reference(models, world, paths, opened)
    save_embeddings(opened, paths.reports / "embeddings" / OPEN_WORLD)
    written.update({f"{OPEN_WORLD}_{k}": v for k, v in write_report(open_report, paths.reports, OPEN_WORLD).items()})
    return written


def _entries(embedded: dict[str, Embedded]) -> list[ModelEmbeddings]:
    return [ModelEmbeddings(m, e.config.role, e.config.version, e.queries, e.gallery, e.config.group)
            for m, e in embedded.items()]


def save_embeddings(embedded: dict[str, Embedded], folder: Path) -> None:
    """Keep each model's benchmark embeddings (float16) for the search benchmarks and later checks."""
    folder.mkdir(parents=True, exist_ok=True)
    for model_id, e in embedded.items():
        arrays: dict[str, Any] = {"queries": e.queries.astype(np.float16)}
        if e.gallery is not None:
            arrays["gallery"] = e.gallery.astype(np.float16)
        np.savez_compressed(folder / f"{model_id}.npz", **arrays)
