"""Half-size storage of a model's server file: weights kept as fp16 in the file, computed in fp32.

Each large float initializer is stored as float16 and cast back to float32 by a `Cast` node, which
onnxruntime folds into a float32 constant when it loads the graph: the file halves, the arithmetic stays
fp32, and the embeddings move only by the weights' rounding (checked against the fp32 file on real photos
before the variant `server-fp16` is registered). For a release that ships a large cloud model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.manifest import Manifest, ModelFile
from models.preprocess import ImageError, load_image

FP16_VARIANT = "server-fp16"
MIN_ELEMENTS = 1024
"""Smaller initializers (shapes, scales, the fingerprint's few constants) stay float32."""
MIN_COSINE = 0.9999


class HalveError(RuntimeError):
    """A half-size file that cannot be made or that moves the embeddings too far."""


@dataclass(frozen=True)
class HalveResult:
    model_id: str
    file: str
    sha256: str
    size_bytes: int
    fp32_size_bytes: int
    cosine_min: float


def halve_file(source: Path, target: Path) -> int:
    """Write `source` with its large float32 initializers stored as float16; return how many were halved."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        stored = f"{init.name}__fp16"
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [stored[:-len("__fp16")]], to=TensorProto.FLOAT,
                                      name=f"{stored}__cast"))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return len(casts)


def halve_model(release_dir: str | Path, model_id: str, photos: Sequence[Path]) -> HalveResult:
    """Write `<id>.server-fp16.onnx` from the server file, check it on `photos` and register it."""
    from models.release import Release, sha256_file
    from models.runtime import OnnxEncoder

    release = Release.load(release_dir, verify=True)
    entry = release.manifest.model(model_id)
    source = release.path(model_id, "server")
    target = source.parent / f"{model_id}.{FP16_VARIANT}.onnx"
    images = []
    for photo in photos:
        try:
            images.append(load_image(photo))
        except ImageError:
            continue
    if not images:
        raise HalveError(f"none of the {len(photos)} check photos could be read")
    halve_file(source, target)
    a = release.encoder(model_id, "server").encode_images(images)
    b = OnnxEncoder(target, entry, threads=None).encode_images(images)
    cosine_min = float(np.min(np.sum(a * b, axis=1)))
    if not np.isfinite(cosine_min) or cosine_min < MIN_COSINE:
        target.unlink()
        raise HalveError(f"{target.name}: cosine to fp32 {cosine_min:.6f} < {MIN_COSINE} on {len(images)} photos")
    result = HalveResult(model_id, target.name, sha256_file(target), target.stat().st_size, source.stat().st_size,
                         cosine_min)
    manifest = Manifest.load(release.folder)
    variants = {**entry.variants, FP16_VARIANT: ModelFile(result.file, result.sha256, precision="fp16-weights")}
    card = {**entry.card, "fp16_weights": {"check_photos": len(images), "cosine_to_fp32_min": round(cosine_min, 7)}}
    models = {**manifest.models, entry.id: replace(entry, variants=variants, card=card)}
    Manifest(spaces=manifest.spaces, models=models, release=manifest.release).save(release.folder)
    return result
