"""A tiny fake Caltech-101 folder (class folders, BACKGROUND_Google, train.txt, test.txt) made of generated photos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = "BACKGROUND_Google"


def class_photo(base: np.ndarray, rng: np.random.Generator, noise: float, size: int = 64) -> bytes:
    """A JPEG of the class's 8x8 colour layout `base` plus per-photo noise, upscaled to `size`."""
    blocks = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(blocks).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_caltech(root: Path, classes: int = 4, train: int = 4, test: int = 3, background: tuple[int, int] = (3, 2),
                 noise: float = 60.0, seed: int = 0, size: int = 64) -> Path:
    """Write a dataset folder shaped like Caltech-101: `classes` categories and BACKGROUND_Google (distractors)."""
    rng = np.random.default_rng(seed)
    images = root / "101_ObjectCategories"
    names = [f"class{c:02d}" for c in range(classes)]
    lists: dict[str, list[str]] = {"train.txt": [], "test.txt": []}
    for name in [*names, BACKGROUND]:
        (images / name).mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, size=(8, 8, 3))
        counts = background if name == BACKGROUND else (train, test)
        number = 1
        for listing, count in zip(lists, counts, strict=True):
            for _ in range(count):
                path = f"{name}/image_{number:04d}.jpg"
                photo_base = rng.uniform(0, 255, size=(8, 8, 3)) if name == BACKGROUND else base
                (images / path).write_bytes(class_photo(photo_base, rng, noise, size))
                lists[listing].append(path)
                number += 1
    for listing, paths in lists.items():
        (root / listing).write_text("\n".join(paths) + "\n")
    return root


def make_open_world(root: Path, pool: int = 3, evaluation: int = 3, photos: int = 4, noise: float = 60.0,
                    seed: int = 1) -> Path:
    """Write a folder shaped like tinyimagenet_open: `images/<wnid>_<name>/val_N.jpg`, pool.txt, eval.txt and
    the category lists; the two splits hold different categories."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[str]] = {"pool": [], "eval": []}
    number = 0
    for c in range(pool + evaluation):
        split = "pool" if c < pool else "eval"
        name = f"n{c:08d}_thing{c}"
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, size=(8, 8, 3))
        for _ in range(photos):
            path = f"{name}/val_{number}.jpg"
            (root / "images" / path).write_bytes(class_photo(base, rng, noise))
            lists[split].append(path)
            number += 1
    for split, paths in lists.items():
        (root / f"{split}.txt").write_text("\n".join(paths) + "\n")
        (root / f"categories_{split}.txt").write_text("\n".join(sorted({p.split('/')[0] for p in paths})) + "\n")
    return root
