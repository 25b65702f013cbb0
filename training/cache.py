"""Frozen-trunk features, computed once per architecture, resolution and view, and kept on disk.

Training freezes the ImageNet trunk and learns the embedding head, so every photo's pooled trunk
features are computed once. The trunk runs through onnxruntime (about 3x faster than torch on these
CPUs; the export is checked against torch in the tests). Work is saved in chunks, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from tqdm import tqdm

from models.atomic import write_atomic
from models.preprocess import Preprocess, load_image, preprocess
from training.arch import build_encoder
from training.convert import to_onnx
from training.fingerprint import Fingerprint, colour_layout

VIEWS = ("plain", "flip", "low")
"""How a photo is shown to the trunk: as it is, mirrored, or as a thumbnail (`low`): its centre square shrunk to
LOW_SIDE pixels, then preprocessed as usual, the way small photos in a library (and the open-world set) look."""
LOW_SIDE = 64
CHUNK = 256


class _Trunk(torch.nn.Module):
    def __init__(self, arch: str, resolution: int) -> None:
        super().__init__()
        self.encoder = build_encoder(arch, resolution)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(image)


def cache_path(cache_dir: Path, arch: str, resolution: int, view: str) -> Path:
    return Path(cache_dir) / "features" / f"{arch}-{resolution}-{view}.npz"


def _load_view(image_dir: Path, rel: str, spec: Preprocess, view: str) -> np.ndarray:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {VIEWS}")
    image = load_image(image_dir / rel)
    if view == "flip":
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif view == "low":
        image = thumbnail(image)
    return preprocess(image, spec)


def thumbnail(image: Image.Image, side: int = LOW_SIDE) -> Image.Image:
    """The photo's centre square, box-filtered down to side x side pixels."""
    width, height = image.size
    square = min(width, height)
    left, top = (width - square) // 2, (height - square) // 2
    return image.crop((left, top, left + square, top + square)).resize((side, side), Image.Resampling.BOX)


def _batches(image_dir: Path, paths: Sequence[str], spec: Preprocess, view: str,
             batch: int) -> Iterator[np.ndarray]:
    """Decode batches in a background thread while the trunk runs on the previous one."""
    with ThreadPoolExecutor(1) as pool:
        def load(i: int) -> np.ndarray:
            return np.stack([_load_view(image_dir, p, spec, view) for p in paths[i:i + batch]])
        starts = list(range(0, len(paths), batch))
        pending = pool.submit(load, starts[0]) if starts else None
        for nxt in [*starts[1:], None]:
            assert pending is not None
            current = pending.result()
            pending = pool.submit(load, nxt) if nxt is not None else None
            yield current


def compute_features(image_dir: Path, paths: Sequence[str], arch: str, resolution: int, view: str,
                     cache_dir: Path, batch: int = 32, threads: int | None = None) -> dict[str, np.ndarray]:
    """Features [1280] of every photo in `paths` for one view; cached and resumable by chunk."""
    target = cache_path(cache_dir, arch, resolution, view)

    def trunk() -> Callable[[np.ndarray], np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = to_onnx(_Trunk(arch, resolution), Path(tmp) / "trunk.onnx", resolution, output="features")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or os.cpu_count() or 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]

    return _cached(target, image_dir, paths, resolution, view, trunk, f"features {arch}@{resolution} {view}", batch)


def fingerprint_features(image_dir: Path, paths: Sequence[str], fingerprint: Fingerprint, resolution: int,
                         view: str, cache_dir: Path, batch: int = 64) -> dict[str, np.ndarray]:
    """Raw fingerprint descriptors of every photo at one input size and view (projected at use: cheap)."""
    target = cache_path(cache_dir, fingerprint.spec.kind, resolution, view)

    def raw() -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: colour_layout(torch.from_numpy(x), fingerprint.spec).numpy()

    return _cached(target, image_dir, paths, resolution, view, raw, f"fingerprint @{resolution} {view}", batch)


def _cached(target: Path, image_dir: Path, paths: Sequence[str], resolution: int, view: str,
            runner: Callable[[], Callable[[np.ndarray], np.ndarray]], desc: str, batch: int) -> dict[str, np.ndarray]:
    """Run `runner()` over the photos not yet in `target`, saving every chunk (a stopped run resumes)."""
    features = _read(target)
    todo = [p for p in dict.fromkeys(paths) if p not in features]
    if not todo:
        return features
    spec = Preprocess(resize=resolution, crop=resolution)
    run = runner()
    bar = tqdm(total=len(todo), desc=desc, unit="photo")
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        rows = [run(x) for x in _batches(image_dir, chunk, spec, view, batch)]
        features.update(zip(chunk, np.concatenate(rows), strict=True))
        _write(target, features)
        bar.update(len(chunk))
    bar.close()
    return features


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path) as data:
        paths = json.loads(str(data["paths"]))
        return dict(zip(paths, data["features"], strict=True))


def _write(path: Path, features: dict[str, np.ndarray]) -> None:
    """Atomic save: a crash leaves the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, paths=json.dumps(list(features)), features=np.stack(list(features.values())))
    write_atomic(path, buffer.getbuffer())


def feature_matrix(features: dict[str, np.ndarray], paths: Sequence[str]) -> np.ndarray:
    """Rows of `features` in the order of `paths`."""
    return np.stack([features[p] for p in paths]).astype(np.float32)
