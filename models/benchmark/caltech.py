"""Caltech-101 per the benchmark protocol: class order, old/new classes, training set, gallery, queries.

Deterministic: classes are `sorted()` folder names without BACKGROUND_Google; the split comes from the
dataset's own `train.txt` / `test.txt`. The path is a setting (`--data` or `CONCORD_DATA`). Torch-free:
training, the edge accuracy check, the release check and the near-duplicate benchmark all read it here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("../shared/datasets/caltech101")
BACKGROUND = "BACKGROUND_Google"
NUM_OLD_CLASSES = 50
DISTRACTOR = -1
"""Label of gallery photos that belong to no class (BACKGROUND_Google)."""


def data_root(root: str | Path | None = None) -> Path:
    """The dataset folder: the argument, else $CONCORD_DATA, else ../shared/datasets/caltech101."""
    return Path(root or os.environ.get("CONCORD_DATA") or DEFAULT_ROOT)


@dataclass(frozen=True)
class PhotoSet:
    """Photos (paths relative to 101_ObjectCategories/) and their class labels (-1: distractor)."""

    paths: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> PhotoSet:
        return PhotoSet(tuple(p for p, keep in zip(self.paths, mask, strict=True) if keep), self.labels[mask])


@dataclass(frozen=True)
class Benchmark:
    """The fixed benchmark: classes, the training photos, the gallery and the queries."""

    root: Path
    classes: tuple[str, ...]
    train: PhotoSet
    gallery: PhotoSet
    queries: PhotoSet

    @property
    def image_dir(self) -> Path:
        return self.root / "101_ObjectCategories"

    def training_set(self, num_classes: int) -> PhotoSet:
        """Training photos of the first `num_classes` classes (50 for v1 models, 101 for v2)."""
        return self.train.subset(self.train.labels < num_classes)

    def is_old_class(self, labels: np.ndarray) -> np.ndarray:
        return (labels >= 0) & (labels < NUM_OLD_CLASSES)

    def all_paths(self) -> tuple[str, ...]:
        """Every photo the benchmark touches, once, in a fixed order."""
        return tuple(dict.fromkeys(self.gallery.paths + self.queries.paths))


def image_dir(root: str | Path | None = None) -> Path:
    """The photo folder, or FileNotFoundError naming the path and the setting when the dataset is absent."""
    root = data_root(root)
    images = root / "101_ObjectCategories"
    if not images.is_dir():
        raise FileNotFoundError(f"Caltech-101 not found at {root} (expected {images}); "
                                "pass --data or set CONCORD_DATA")
    return images


def read_list(root: str | Path | None, name: str, keep_background: bool) -> list[str]:
    """The photo paths (relative to the photo folder) of one split file, e.g. `test.txt`."""
    folder = image_dir(root).parent
    lines = [line.strip() for line in (folder / name).read_text().splitlines() if line.strip()]
    return [p for p in lines if keep_background or not p.startswith(BACKGROUND + "/")]


def load_benchmark(root: str | Path | None = None) -> Benchmark:
    """Read the split files; raise FileNotFoundError naming the path and the setting when absent."""
    images = image_dir(root)
    classes = tuple(sorted(d.name for d in images.iterdir() if d.is_dir() and d.name != BACKGROUND))
    index = {name: i for i, name in enumerate(classes)}

    def read(name: str, keep_background: bool) -> PhotoSet:
        lines = read_list(root, name, keep_background)
        labels = np.array([index.get(p.split("/")[0], DISTRACTOR) for p in lines], dtype=np.int64)
        return PhotoSet(tuple(lines), labels)

    gallery = read("train.txt", keep_background=True)
    train = gallery.subset(gallery.labels != DISTRACTOR)
    return Benchmark(images.parent, classes, train, gallery, read("test.txt", keep_background=False))


@dataclass(frozen=True)
class Split:
    """Photos of the benchmark split with class labels (-1: distractor)."""

    image_dir: Path
    gallery: list[str]
    gallery_labels: np.ndarray
    queries: list[str]
    query_labels: np.ndarray


def load_split(root: str | Path | None = None) -> Split:
    """The benchmark split (`load_benchmark`): train.txt as the gallery (background kept), test.txt queries."""
    bench = load_benchmark(root)
    return Split(bench.image_dir, list(bench.gallery.paths), bench.gallery.labels, list(bench.queries.paths),
                 bench.queries.labels)
