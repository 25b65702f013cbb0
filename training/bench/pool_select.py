"""Choose training settings on the open-world POOL, never on `eval`: train each candidate config with the pool
photos of half the pool categories (label-free, as usual), and measure it on the other half by category
(leave-one-out Recall@1, against itself and against every older cloud gallery, and the flip rates from the model
it replaces there, with the share of those negative flips the gallery's own model misses too: flips inherited from
the space the candidate learns).

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

    python -m training.bench.pool_select --caltech --seeds 3 training/configs/edge-v3.toml

`--seeds N` trains each candidate N times (its config's seed, then the next ones) and prints, beside each run's
figures, every figure's median and range over the seeds and the flip rates between the runs: a difference
between two settings smaller than what retraining alone moves is no choice at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from models.benchmark.caltech import Benchmark, PhotoSet, load_benchmark
from models.benchmark.metrics import evaluate_retrieval, flip_rates
from models.benchmark.open_world import OpenWorld, load_open_world
from training.benchmark import RECIPE, Paths, Source, encode_source, recipe_protocol, train_model
from training.trainer import TrainConfig, load_checkpoint

GALLERIES = ("cloud-v1", "cloud-v2", "cloud-v3")
Figures = dict[str, float]
Hits = dict[str, np.ndarray]
"""Per query set and gallery (the figures' key prefix, e.g. 'caltech -> cloud-v2'), whether each query's top-1 hit
was right."""


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
                      exclude_self: bool) -> tuple[Figures, Hits]:
    """Recall@1 and mAP of the candidate's queries on every gallery, its flip rates from the replaced model, and,
    with every gallery of the chain there, its three-generation dip; and its hits on each gallery."""
    none = np.zeros(len(labels), dtype=bool)
    figures, hits = {}, {}
    for gallery, vecs in galleries.items():
        result = evaluate_retrieval(vectors[candidate], vecs, labels, gallery_labels, none, exclude_self=exclude_self)
        hits[f"{prefix}-> {gallery}"] = result.hits_at_1
        overall = result.to_dict()["overall"]
        figures[f"{prefix}-> {gallery} R@1"] = float(overall["recall@1"])
        figures[f"{prefix}-> {gallery} mAP"] = float(overall["map"])
        if replaced in vectors:
            old = evaluate_retrieval(vectors[replaced], vecs, labels, gallery_labels, none, exclude_self=exclude_self)
            nfr, pfr = flip_rates(old.hits_at_1, result.hits_at_1)
            figures[f"{prefix}-> {gallery} NFR"], figures[f"{prefix}-> {gallery} PFR"] = nfr, pfr
            if gallery in vectors and gallery != candidate:
                own = evaluate_retrieval(vectors[gallery], vecs, labels, gallery_labels, none,
                                         exclude_self=exclude_self)
                figures[f"{prefix}-> {gallery} NFR flips {gallery} misses too"] = inherited(
                    old.hits_at_1, result.hits_at_1, own.hits_at_1)
    if set(GALLERIES) <= set(galleries):
        figures[f"{prefix}three-generation dip"] = three_generation_dip(vectors[candidate], galleries, labels,
                                                                        gallery_labels, exclude_self)
    return figures, hits


def inherited(replaced: np.ndarray, candidate: np.ndarray, gallery_model: np.ndarray) -> float:
    """Of the queries the replaced model got right and the candidate wrong (its negative flips), the share the
    gallery's own model also gets wrong as a query: flips a candidate that learns that model's space inherits
    from it (NaN without flips)."""
    flips = replaced & ~candidate
    return float((flips & ~gallery_model).sum() / flips.sum()) if flips.any() else float("nan")


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


def caltech_figures(config: TrainConfig, paths: Paths, bench: Benchmark) -> tuple[Figures, Hits]:
    """The candidate's figures on the split's Caltech validation photos (its queries) against its gallery."""
    models = [m for m in {*GALLERIES, config.model_id, config.replaces} if m and paths.checkpoint(m).exists()]
    checkpoints = {m: load_checkpoint(paths.checkpoint(m)) for m in models}
    queries = Source(bench.image_dir, paths.cache, bench.queries)
    vectors = {m: encode_source(c, queries) for m, c in checkpoints.items()}
    galleries = {m: encode_source(checkpoints[m], Source(bench.image_dir, paths.cache, bench.gallery))
                 for m in GALLERIES if m in checkpoints}
    return retrieval_figures(vectors, galleries, bench.queries.labels, bench.gallery.labels, config.model_id,
                             config.replaces, "caltech ", exclude_self=False)


def run_name(config_file: Path, references: Path, seed_offset: int = 0) -> str:
    """A candidate's run folder and report name: its config's name, the seed beyond the config's, the chain."""
    seed = f"-seed+{seed_offset}" if seed_offset else ""
    return config_file.stem + seed + SUFFIX.get(references, "")


def measure(config_file: Path, references: Path = Path("runs"), seed_offset: int = 0) -> tuple[Figures, Hits]:
    """Train the config (its seed + `seed_offset`) on the split pool and return its Recall@1 on the held-out pool
    categories, the models it needs taken from `references` (CALTECH_CHAIN: trained on the split Caltech photos
    too, and measured there), and its hits there."""
    config = TrainConfig.from_toml(config_file)
    config = dataclasses.replace(config, seed=config.seed + seed_offset)
    caltech = references == CALTECH_CHAIN
    runs = Path("runs-select") / run_name(config_file, references, seed_offset)
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
    figures, hits = retrieval_figures(vectors, galleries, held.labels, held.labels, config.model_id, config.replaces,
                                      "", exclude_self=True)
    if caltech:
        more, more_hits = caltech_figures(config, paths, bench)
        figures, hits = {**figures, **more}, {**hits, **more_hits}
    return figures, hits


def across_seeds(runs: list[Figures], hits: list[Hits]) -> Figures:
    """Every figure's median, lowest and highest over the seeds, and the flip rates between each pair of seeds on
    each query set and gallery: how far retraining alone moves a figure."""
    summary: Figures = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary |= {f"{key} median": float(np.median(values)), f"{key} min": min(values), f"{key} max": max(values)}
    for (i, first), (j, second) in itertools.combinations(enumerate(hits), 2):
        for key in first:
            nfr, pfr = flip_rates(first[key], second[key])
            summary |= {f"seed +{i} vs +{j} {key} NFR": nfr, f"seed +{i} vs +{j} {key} PFR": pfr}
    return summary


def seeds_table(name: str, runs: list[Figures], summary: Figures) -> str:
    """The figures over the seeds as a table a person reads: each figure's median and range, and each pair of
    seeds' flips beside it where the figure is a query set on a gallery."""
    pairs = [f"+{i} vs +{j}" for i, j in itertools.combinations(range(len(runs)), 2)]
    lines = [f"{name}: {len(runs)} seeds", "| figure | median | min-max | " + " | ".join(
        f"NFR/PFR seeds {pair}" for pair in pairs) + " |", "|---|---|---|" + "---|" * len(pairs)]
    for key in runs[0]:
        prefix = key.removesuffix(" R@1")
        flips = [f"{summary[f'seed {pair} {prefix} NFR']:.3f} / {summary[f'seed {pair} {prefix} PFR']:.3f}"
                 if key.endswith(" R@1") and f"seed {pair} {prefix} NFR" in summary else "" for pair in pairs]
        lines.append(f"| {key} | {summary[f'{key} median']:.4f} | {summary[f'{key} min']:.4f}-"
                     f"{summary[f'{key} max']:.4f} | " + " | ".join(flips) + " |")
    return "\n".join(lines)


def report(out: Path, name: str, figures: Figures, shown: str | None = None) -> None:
    """Write the figures to `out/<name>.json` and print them: `shown`, else one line."""
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(shown or name + " " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.bench.pool_select",
                                     description="Choose training settings on the open-world pool photos, never on "
                                                 "`eval`.")
    parser.add_argument("configs", nargs="+", type=Path, help="candidate config files (TOML)")
    parser.add_argument("--chain", action="store_true", help="judge against the chain trained on the split pool")
    parser.add_argument("--caltech", action="store_true", help="also hold out Caltech-101 validation photos")
    parser.add_argument("--seeds", type=int, default=1, help="train each candidate this many times (default 1)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds takes a count of at least 1")
    out = Path("reports/select")
    out.mkdir(parents=True, exist_ok=True)
    for config_file in args.configs:
        model_id = TrainConfig.from_toml(config_file).model_id
        references = train_chain_before(model_id, args.caltech) if args.chain or args.caltech else Path("runs")
        runs, hits = [], []
        for offset in range(args.seeds):
            figures, seed_hits = measure(config_file, references, offset)
            report(out, run_name(config_file, references, offset), figures)
            runs.append(figures)
            hits.append(seed_hits)
        if args.seeds > 1:
            name = run_name(config_file, references) + f"-{args.seeds}seeds"
            summary = across_seeds(runs, hits)
            report(out, name, summary, seeds_table(name, runs, summary))


if __name__ == "__main__":
    main()
