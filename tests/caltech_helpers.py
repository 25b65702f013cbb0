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
                 noise: float = 60.0, seed: int = 0) -> Path:
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
                (images / path).write_bytes(class_photo(photo_base, rng, noise))
                lists[listing].append(path)
                number += 1
    for listing, paths in lists.items():
        (root / listing).write_text("\n".join(paths) + "\n")
    return root
