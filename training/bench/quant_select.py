"""Choose how an edge model is quantised on the open-world POOL photos, never on `eval`: quantise its device file with
each number of trunk blocks kept in float (`concord quantize --float-blocks`) and measure the int8 file's queries
against every cloud gallery of the chain (the benchmark's checkpoints, which `concord restore` makes the shipped
models) and its three-generation dip, beside the fp32 checkpoint's figures (what quantising can at best keep).

    python -m training.bench.quant_select --release runs/release edge-v3 0 1 2 3

The release is left as it is (each trial quantises into a linked copy beside it); prints one line per setting
and merges them into reports/select/quant-<model>.json (a rerun of one setting keeps the others' figures). The
edge models trained on the pool photos label-free, so the figures compare the int8 files with one another, not
with pool_select's held-out figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from edge.photos import list_photos
from edge.quantize import INT8_VARIANT, QuantizeConfig, quantize_model
from models.benchmark.caltech import data_root
from models.benchmark.open_world import load_open_world
from models.preprocess import load_image
from models.release import Release
from training.bench.pool_select import GALLERIES, retrieval_figures
from training.benchmark import Paths, Source, encode_source
from training.trainer import load_checkpoint


def linked_copy(release: Path, into: Path) -> Path:
    """A copy of `release` whose model files are hard links (free) and whose manifest is its own (quantise edits it)."""
    for path in release.iterdir():
        if path.name == "manifest.json":
            shutil.copyfile(path, into / path.name)
        else:
            os.link(path, into / path.name)
    return into


def measure(release: Path, model_id: str, float_blocks: int, calibration: list[Path],
            photos: list[Image.Image], labels: np.ndarray, galleries: dict[str, np.ndarray]) -> dict[str, float]:
    """Quantise `model_id` with `float_blocks` blocks kept float and return its int8 queries' figures."""
    with tempfile.TemporaryDirectory(dir=release.parent) as tmp:
        trial = linked_copy(release, Path(tmp))
        result = quantize_model(trial, model_id, calibration, QuantizeConfig(float_blocks=float_blocks))
        vectors = Release.load(trial).encoder(model_id, INT8_VARIANT).encode_images(photos)
    return {**query_figures(model_id, vectors, labels, galleries),
            "cosine to fp32 (calibration photos)": result.cosine_mean, "MB": result.size_bytes / 1e6}


def query_figures(model_id: str, vectors: np.ndarray, labels: np.ndarray,
                  galleries: dict[str, np.ndarray]) -> dict[str, float]:
    """Recall@1 and mAP of `vectors` as `model_id`'s queries on every gallery (own photo left out), and the dip."""
    return retrieval_figures({model_id: vectors}, galleries, labels, labels, model_id, "", "", exclude_self=True)[0]


def show(label: str, figures: dict[str, float]) -> None:
    print(label, "  ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)


FP32 = "fp32"
"""The report's key for the fp32 checkpoint's figures; the settings' keys are their float block counts."""


def record(out: Path, found: dict[str, dict[str, float]]) -> None:
    """Merge `found` into the report at `out`, so settings measured in another run keep their figures."""
    kept = json.loads(out.read_text()) if out.exists() else {}
    kept.update(found)
    order = sorted(kept, key=lambda key: -1 if key == FP32 else int(key))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({key: kept[key] for key in order}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.bench.quant_select",
                                     description="Choose how many trunk blocks an edge model's int8 file keeps in "
                                                 "float, on the open-world pool photos (never `eval`).")
    parser.add_argument("--release", type=Path, required=True, help="the full release folder (concord export's)")
    parser.add_argument("model_id", help="the edge model to quantise, e.g. edge-v3")
    parser.add_argument("float_blocks", nargs="+", type=int, help="settings to try: trunk blocks kept in float")
    args = parser.parse_args(argv)
    world, paths = load_open_world(), Paths()
    source = Source(world.image_dir, paths.open_cache, world.pool)
    galleries = {m: encode_source(load_checkpoint(paths.checkpoint(m)), source) for m in GALLERIES}
    photos = [load_image(world.image_dir / p) for p in world.pool.paths]
    calibration = list_photos(data_root() / "train.txt", 256)  # as `concord quantize` shipped it
    fp32 = encode_source(load_checkpoint(paths.checkpoint(args.model_id)), source)
    found = {FP32: query_figures(args.model_id, fp32, world.pool.labels, galleries)}
    show("fp32 checkpoint", found[FP32])
    for blocks in args.float_blocks:
        found[str(blocks)] = measure(args.release, args.model_id, blocks, calibration, photos, world.pool.labels,
                                     galleries)
        show(f"float_blocks {blocks}", found[str(blocks)])
    record(Path("reports/select") / f"quant-{args.model_id}.json", found)


if __name__ == "__main__":
    main()
