"""Choose training settings on the open-world POOL, never on `eval`: train each candidate config with the pool
photos of half the pool categories (label-free, as usual), and measure it on the other half by category
(leave-one-out Recall@1, against itself and against every older cloud gallery, and the flip rates from the model
it replaces there).

    python -m training.bench.pool_select training/configs/cloud-v3.toml other-cloud-v3.toml ...

Checkpoints go to `runs-select/<config file stem>/`; the released models it needs as references are read
from `runs/` (symlinked, never retrained). Prints one table and writes reports/select/<stem>.json.

    python -m training.bench.pool_select --chain training/configs/edge-v2.toml training/configs/edge-v3.toml

`--chain` first trains the recipe's models that come before each candidate on the split pool as well
(`runs-select/_chain/`) and judges the candidate against those. The released models saw the held-out
categories, so a candidate that starts from one of them or distils it is flattered without `--chain`: edge-v3
from the released edge-v2 scored 0.672 on cloud-v2's held-out gallery where edge-v2 itself, trained on the
split pool, scored 0.607; with `--chain` the two are 0.613 and 0.606 (and on `eval` edge-v3 fell below edge-v2).

    python -m training.bench.pool_select --caltech training/configs/edge-v3.toml

`--caltech` also holds out every fourth labelled Caltech-101 training photo of each class (never `test.txt`):
nothing trains on them (the chain is trained without them too, in `runs-select/_chain-caltech/`), and they
query the rest of the gallery, so a setting's Caltech Recall@1 and flip rates are measured on validation photos.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from models.benchmark.caltech import Benchmark, PhotoSet, load_benchmark
from models.benchmark.metrics import evaluate_retrieval, flip_rates
from models.benchmark.open_world import OpenWorld, load_open_world
from training.benchmark import RECIPE, Paths, Source, encode_source, recipe_protocol, train_model
from training.trainer import TrainConfig, load_checkpoint

GALLERIES = ("cloud-v1", "cloud-v2", "cloud-v3")


def split_pool(world: OpenWorld) -> tuple[OpenWorld, PhotoSet]:
    """The world whose pool is the even-numbered pool categories (training), and the odd ones (validation)."""
    category = np.array([p.split("/")[0] for p in world.pool.paths])
    names = sorted(set(category))
    index = np.array([names.index(c) for c in category])
    train = world.pool.subset(index % 2 == 0)
    held = world.pool.subset(index % 2 == 1)
    return dataclasses.replace(world, pool=train), PhotoSet(held.paths, index[index % 2 == 1])


def split_caltech(bench: Benchmark) -> Benchmark:
    """The benchmark whose queries are every fourth labelled training photo of each class (in path order), none of
    them in its training set or gallery; the gallery keeps the rest, distractors included."""
    held = np.zeros(len(bench.gallery), dtype=bool)
    for label in np.unique(bench.train.labels):
        (members,) = np.nonzero(bench.gallery.labels == label)
        held[members[3::4]] = True
    gallery = bench.gallery.subset(~held)
    train = gallery.subset(gallery.labels >= 0)
    return dataclasses.replace(bench, train=train, gallery=gallery, queries=bench.gallery.subset(held))


CHAIN = Path("runs-select") / "_chain"
CALTECH_CHAIN = Path("runs-select") / "_chain-caltech"
MAIN_CHAIN = ("cloud-v1", "edge-v1", "cloud-v2", "edge-v2", "cloud-v3", "edge-v3")
SUFFIX = {CHAIN: "-chain", CALTECH_CHAIN: "-caltech"}
"""What a candidate's run folder and report add to its config's name, by the chain it was judged against."""


def selection_bench(caltech: bool) -> Benchmark:
    """The Caltech-101 photos a selection run trains on: all of them, or the split's training part."""
    return split_caltech(load_benchmark()) if caltech else load_benchmark()


def train_chain_before(model_id: str, caltech: bool = False) -> Path:
    """The main chain's models before `model_id`, trained on the split pool (and with `caltech` the split Caltech
    photos) into CHAIN or CALTECH_CHAIN (kept between runs)."""
    world, _ = split_pool(load_open_world())
    runs = CALTECH_CHAIN if caltech else CHAIN
    bench = selection_bench(caltech)
    for model in MAIN_CHAIN[:MAIN_CHAIN.index(model_id)]:
        train_model(model, bench, Paths(runs=runs), world=world)
    return runs


def retrieval_figures(vectors: dict[str, np.ndarray], galleries: dict[str, np.ndarray], labels: np.ndarray,
                      gallery_labels: np.ndarray, candidate: str, replaced: str, prefix: str,
                      exclude_self: bool) -> dict[str, float]:
    """Recall@1 and mAP of the candidate's queries on every gallery, its flip rates from the replaced model, and,
    with every gallery of the chain there, its three-generation dip."""
    none = np.zeros(len(labels), dtype=bool)
    figures = {}
    for gallery, vecs in galleries.items():
        result = evaluate_retrieval(vectors[candidate], vecs, labels, gallery_labels, none, exclude_self=exclude_self)
        overall = result.to_dict()["overall"]
        figures[f"{prefix}-> {gallery} R@1"] = float(overall["recall@1"])
        figures[f"{prefix}-> {gallery} mAP"] = float(overall["map"])
        if replaced in vectors:
            old = evaluate_retrieval(vectors[replaced], vecs, labels, gallery_labels, none, exclude_self=exclude_self)
            nfr, pfr = flip_rates(old.hits_at_1, result.hits_at_1)
            figures[f"{prefix}-> {gallery} NFR"], figures[f"{prefix}-> {gallery} PFR"] = nfr, pfr
    if set(GALLERIES) <= set(galleries):
        figures[f"{prefix}three-generation dip"] = three_generation_dip(vectors[candidate], galleries, labels,
                                                                        gallery_labels, exclude_self)
    return figures


def three_generation_dip(queries: np.ndarray, galleries: dict[str, np.ndarray], labels: np.ndarray,
                         gallery_labels: np.ndarray, exclude_self: bool) -> float:
    """The benchmark's three-generation curve (its `chain_mixed` spec) for these queries: how far their Recall@1
    falls below the all-old end."""
    spec = recipe_protocol().chain_mixed
    assert spec is not None and spec.oldest, "the recipe's protocol holds a three-generation gallery"
    none = np.zeros(len(labels), dtype=bool)
    curve = [evaluate_retrieval(queries, spec.mix(galleries, p), labels, gallery_labels, none,
                                exclude_self=exclude_self).overall.recall_at_1 for p in spec.shares]
    return max(0.0, float(curve[0]) - float(min(curve)))


def caltech_figures(config: TrainConfig, paths: Paths, bench: Benchmark) -> dict[str, float]:
    """The candidate's figures on the split's Caltech validation photos (its queries) against its gallery."""
    models = [m for m in {*GALLERIES, config.model_id, config.replaces} if m and paths.checkpoint(m).exists()]
    checkpoints = {m: load_checkpoint(paths.checkpoint(m)) for m in models}
    queries = Source(bench.image_dir, paths.cache, bench.queries)
    vectors = {m: encode_source(c, queries) for m, c in checkpoints.items()}
    galleries = {m: encode_source(checkpoints[m], Source(bench.image_dir, paths.cache, bench.gallery))
                 for m in GALLERIES if m in checkpoints}
    return retrieval_figures(vectors, galleries, bench.queries.labels, bench.gallery.labels, config.model_id,
                             config.replaces, "caltech ", exclude_self=False)


def measure(config_file: Path, references: Path = Path("runs")) -> dict[str, float]:
    """Train the config on the split pool and return its Recall@1 on the held-out pool categories, the models it
    needs taken from `references` (CALTECH_CHAIN: trained on the split Caltech photos too, and measured there)."""
    config = TrainConfig.from_toml(config_file)
    caltech = references == CALTECH_CHAIN
    runs = Path("runs-select") / (config_file.stem + SUFFIX.get(references, ""))
    for model in RECIPE:
        link = runs / model
        if model != config.model_id and not link.exists() and (references / model).exists():
            runs.mkdir(parents=True, exist_ok=True)
            link.symlink_to((references / model).resolve())
    paths = Paths(runs=runs)
    world, held = split_pool(load_open_world())
    bench = selection_bench(caltech)
    train_model(config.model_id, bench, paths, config, world)
    source = Source(world.image_dir, paths.open_cache, held)
    vectors = {m: encode_source(load_checkpoint(paths.checkpoint(m)), source)
               for m in {*GALLERIES, config.model_id, config.replaces} if m and paths.checkpoint(m).exists()}
    galleries = {m: vectors[m] for m in GALLERIES if m in vectors}
    figures = retrieval_figures(vectors, galleries, held.labels, held.labels, config.model_id, config.replaces, "",
                                exclude_self=True)
    return {**figures, **(caltech_figures(config, paths, bench) if caltech else {})}


def main(args: list[str]) -> None:
    chain, caltech = "--chain" in args, "--caltech" in args
    out = Path("reports/select")
    out.mkdir(parents=True, exist_ok=True)
    for name in (a for a in args if a not in ("--chain", "--caltech")):
        model_id = TrainConfig.from_toml(Path(name)).model_id
        references = train_chain_before(model_id, caltech) if chain or caltech else Path("runs")
        figures = measure(Path(name), references)
        stem = Path(name).stem + SUFFIX.get(references, "")
        (out / f"{stem}.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(stem, "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
