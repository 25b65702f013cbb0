"""Benchmark embeddings: photos encoded by release models in chunks, cached on disk by model file and photo list.

A cache key names the model's file hash and a digest of the photo list, so a new model or another split never
reads a stale entry.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic import write_atomic
from models.preprocess import ImageError, load_image

CHUNK = 64


def encode_paths(encoders: Sequence[Any], paths: Sequence[Path], label: str = "") -> list[np.ndarray]:
    """Decode photos in chunks and encode each chunk with every encoder (one decoding for all)."""
    out: list[list[np.ndarray]] = [[] for _ in encoders]
    show = progress(len(paths), label)
    for start in range(0, len(paths), CHUNK):
        images = []
        for path in paths[start:start + CHUNK]:
            try:
                images.append(load_image(path))
            except ImageError as err:
                raise ImageError(f"benchmark photo unusable: {err}") from None
        for i, encoder in enumerate(encoders):
            out[i].append(np.asarray(encoder.encode_images(images), dtype=np.float32))
        show(start + len(images))
    return [np.concatenate(chunks) for chunks in out]


def cached(cache_dir: Path, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    """Load `<key>.npy` from the cache, or make it and save it there (atomically)."""
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        return np.asarray(np.load(path))
    array = make()
    cache_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getbuffer())
    return array


def names_digest(names: Sequence[str]) -> str:
    """A short digest of a photo list, for cache keys."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def progress(total: int, label: str) -> Callable[[int], None]:
    def show(done: int) -> None:
        if label:
            end = "\n" if done >= total else ""
            print(f"\r  encoding {label}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    return show
