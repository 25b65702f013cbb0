"""Choose training settings on the open-world POOL, never on `eval`: train each candidate config with the pool
photos of half the pool categories (label-free, as usual), and measure it on the other half by category
(leave-one-out Recall@1, against itself and against every older cloud gallery).

    python -m training.bench.pool_select training/configs/cloud-v3.toml other-cloud-v3.toml ...

Checkpoints go to `runs-select/<config file stem>/`; the released models it needs as references are read
from `runs/` (symlinked, never retrained). Prints one table and writes reports/select/<stem>.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from models.benchmark.caltech import PhotoSet, load_benchmark
from models.benchmark.metrics import evaluate_retrieval
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


def measure(config_file: Path) -> dict[str, float]:
    """Train the config on the split pool and return its Recall@1 on the held-out pool categories."""
    config = TrainConfig.from_toml(config_file)
    runs = Path("runs-select") / config_file.stem
    for model in RECIPE:
        link = runs / model
        if model != config.model_id and not link.exists() and (Path("runs") / model).exists():
            runs.mkdir(parents=True, exist_ok=True)
            link.symlink_to((Path("runs") / model).resolve())
    paths = Paths(runs=runs)
    world, held = split_pool(load_open_world())
    train_model(config.model_id, load_benchmark(), paths, config, world)
    source = Source(world.image_dir, paths.open_cache, held)
    vectors = {m: encode_source(load_checkpoint(paths.checkpoint(m)), source)
               for m in {*GALLERIES, config.model_id} if paths.checkpoint(m).exists()}
    none = np.zeros(len(held), dtype=bool)
    figures = {}
    for gallery in GALLERIES:
        if gallery in vectors:
            result = evaluate_retrieval(vectors[config.model_id], vectors[gallery], held.labels, held.labels, none,
                                        exclude_self=True)
            overall = result.to_dict()["overall"]
            figures[f"-> {gallery} R@1"] = float(overall["recall@1"])
            figures[f"-> {gallery} mAP"] = float(overall["map"])
    return figures


def main(files: list[str]) -> None:
    out = Path("reports/select")
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        figures = measure(Path(name))
        (out / f"{Path(name).stem}.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(Path(name).stem, "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
