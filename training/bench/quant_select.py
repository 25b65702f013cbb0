"""Choose how an edge model is quantised on the open-world POOL photos, never on `eval`: quantise its device file with
each number of trunk blocks kept in float (`concord quantize --float-blocks`) and measure the int8 file's queries
against every cloud gallery of the chain (the benchmark's checkpoints, which `concord restore` makes the shipped
models) and its three-generation dip.

    python -m training.bench.quant_select --release runs/release edge-v3 0 1 2 3

The release is left as it is (each trial quantises into a linked copy beside it); prints one line per setting
and writes reports/select/quant-<model>.json. The edge models trained on the pool photos label-free, so the
figures compare the int8 files with one another, not with pool_select's held-out figures.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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
    figures, _ = retrieval_figures({model_id: vectors}, galleries, labels, labels, model_id, "", "", exclude_self=True)
    return {**figures, "cosine to fp32 (calibration photos)": result.cosine_mean, "MB": result.size_bytes / 1e6}


def main(args: list[str]) -> None:
    if len(args) < 4 or args[0] != "--release":
        raise SystemExit("usage: python -m training.bench.quant_select --release FOLDER MODEL FLOAT_BLOCKS...")
    release, model_id, settings = Path(args[1]), args[2], [int(a) for a in args[3:]]
    world, paths = load_open_world(), Paths()
    source = Source(world.image_dir, paths.open_cache, world.pool)
    galleries = {m: encode_source(load_checkpoint(paths.checkpoint(m)), source) for m in GALLERIES}
    photos = [load_image(world.image_dir / p) for p in world.pool.paths]
    calibration = list_photos(data_root() / "train.txt", 256)  # as `concord quantize` shipped it
    found = {}
    for blocks in settings:
        found[blocks] = measure(release, model_id, blocks, calibration, photos, world.pool.labels, galleries)
        print(f"float_blocks {blocks}", "  ".join(f"{k} {v:.4f}" for k, v in found[blocks].items()), flush=True)
    out = Path("reports/select")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quant-{model_id}.json").write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
