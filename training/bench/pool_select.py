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
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from models.benchmark.caltech import PhotoSet, load_benchmark
from models.benchmark.metrics import evaluate_retrieval, flip_rates
from models.benchmark.open_world import OpenWorld, load_open_world
from training.benchmark import RECIPE, Paths, Source, encode_source, train_model
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


CHAIN = Path("runs-select") / "_chain"
MAIN_CHAIN = ("cloud-v1", "edge-v1", "cloud-v2", "edge-v2", "cloud-v3", "edge-v3")


def train_chain_before(model_id: str) -> Path:
    """The main chain's models before `model_id`, trained on the split pool into CHAIN (kept between runs)."""
    world, _ = split_pool(load_open_world())
    bench = load_benchmark()
    for model in MAIN_CHAIN[:MAIN_CHAIN.index(model_id)]:
        train_model(model, bench, Paths(runs=CHAIN), world=world)
    return CHAIN


def measure(config_file: Path, references: Path = Path("runs")) -> dict[str, float]:
    """Train the config on the split pool and return its Recall@1 on the held-out pool categories, the models it
    needs taken from `references`."""
    config = TrainConfig.from_toml(config_file)
    runs = Path("runs-select") / (config_file.stem + ("-chain" if references == CHAIN else ""))
    for model in RECIPE:
        link = runs / model
        if model != config.model_id and not link.exists() and (references / model).exists():
            runs.mkdir(parents=True, exist_ok=True)
            link.symlink_to((references / model).resolve())
    paths = Paths(runs=runs)
    world, held = split_pool(load_open_world())
    train_model(config.model_id, load_benchmark(), paths, config, world)
    source = Source(world.image_dir, paths.open_cache, held)
    vectors = {m: encode_source(load_checkpoint(paths.checkpoint(m)), source)
               for m in {*GALLERIES, config.model_id, config.replaces} if m and paths.checkpoint(m).exists()}
    none = np.zeros(len(held), dtype=bool)
    figures = {}
    for gallery in GALLERIES:
        if gallery in vectors:
            result = evaluate_retrieval(vectors[config.model_id], vectors[gallery], held.labels, held.labels, none,
                                        exclude_self=True)
            overall = result.to_dict()["overall"]
            figures[f"-> {gallery} R@1"] = float(overall["recall@1"])
            figures[f"-> {gallery} mAP"] = float(overall["map"])
            if config.replaces in vectors:
                old = evaluate_retrieval(vectors[config.replaces], vectors[gallery], held.labels, held.labels, none,
                                         exclude_self=True)
                nfr, pfr = flip_rates(old.hits_at_1, result.hits_at_1)
                figures[f"-> {gallery} NFR"], figures[f"-> {gallery} PFR"] = nfr, pfr
    return figures


def main(args: list[str]) -> None:
    chain = "--chain" in args
    out = Path("reports/select")
    out.mkdir(parents=True, exist_ok=True)
    for name in (a for a in args if a != "--chain"):
        model_id = TrainConfig.from_toml(Path(name)).model_id
        references = train_chain_before(model_id) if chain else Path("runs")
        figures = measure(Path(name), references)
        stem = Path(name).stem + ("-chain" if chain else "")
        (out / f"{stem}.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(stem, "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
