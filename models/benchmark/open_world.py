"""The open-world part of the benchmark protocol: photos of categories that are not Caltech-101's.

`../shared/datasets/tinyimagenet_open` (the path is a setting: `--open-data` or `CONCORD_OPEN_DATA`) splits
its categories in two halves that share no category and no photo:
- `pool`: label-free training photos (distillation, regression) and the place to choose settings, its
  category folders serving as validation labels;
- `eval`: the benchmark only. Every eval photo queries a gallery of all the other eval photos
  (its own photo left out); relevant = the same category. Nothing trains or tunes on it.

Labels are the index of the photo's category in the sorted category list of its split. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.benchmark.caltech import PhotoSet

DEFAULT_ROOT = Path("../shared/datasets/tinyimagenet_open")
NAME = "tinyimagenet_open"
"""The benchmark's name in reports and in the manifest's figures."""
SPLITS = ("pool", "eval")


def data_root(root: str | Path | None = None) -> Path:
    """The dataset folder: the argument, else $CONCORD_OPEN_DATA, else ../shared/datasets/tinyimagenet_open."""
    return Path(root or os.environ.get("CONCORD_OPEN_DATA") or DEFAULT_ROOT)


@dataclass(frozen=True)
class OpenWorld:
    """The open-world set: its two category-disjoint splits and each split's sorted categories."""

    root: Path
    pool: PhotoSet
    eval: PhotoSet
    pool_classes: tuple[str, ...]
    eval_classes: tuple[str, ...]

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def name(self) -> str:
        return NAME

    def all_paths(self) -> tuple[str, ...]:
        """Every photo of both splits, pool first, once each."""
        return tuple(dict.fromkeys(self.pool.paths + self.eval.paths))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _split(root: Path, name: str) -> tuple[PhotoSet, tuple[str, ...]]:
    """The photos of one split with labels = index of their category in the split's sorted category list."""
    listed = root / f"categories_{name}.txt"
    photos = _read_lines(root / f"{name}.txt")
    found = sorted({p.split("/")[0] for p in photos})
    classes = tuple(sorted(_read_lines(listed))) if listed.is_file() else tuple(found)
    index = {c: i for i, c in enumerate(classes)}
    strays = sorted(set(found) - set(index))
    if strays:
        raise ValueError(f"{root / (name + '.txt')}: photos of categories not in {listed.name}: {strays[:5]}")
    if len(set(photos)) != len(photos):
        raise ValueError(f"{root / (name + '.txt')} lists a photo twice")
    labels = np.array([index[p.split("/")[0]] for p in photos], dtype=np.int64)
    return PhotoSet(tuple(photos), labels), classes


def load_open_world(root: str | Path | None = None) -> OpenWorld:
    """Read both splits; FileNotFoundError naming the path and the setting when the dataset is absent, ValueError
    when the splits share a category or a photo (eval must never train anything)."""
    folder = data_root(root)
    missing = [n for n in ("images", *(f"{s}.txt" for s in SPLITS)) if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"open-world set not found at {folder} (missing {', '.join(missing)}); "
                                "pass --open-data or set CONCORD_OPEN_DATA")
    pool, pool_classes = _split(folder, "pool")
    evaluation, eval_classes = _split(folder, "eval")
    shared = sorted(set(pool_classes) & set(eval_classes)) or sorted(set(pool.paths) & set(evaluation.paths))
    if shared:
        raise ValueError(f"{folder}: pool and eval must share no category and no photo, both hold {shared[:5]}")
    return OpenWorld(folder, pool, evaluation, pool_classes, eval_classes)
