"""Static int8 quantisation of an edge model's batch-1 device file, calibrated on real photos.

QDQ format, int8 weights per output channel, int8 activations whose ranges come from running the fp32
graph on real photos preprocessed exactly as the manifest says. The result is written beside the fp32
file as `<id>.device-int8.onnx` and registered in the manifest as the variant `device-int8`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.manifest import Manifest, ModelFile
from models.preprocess import ImageError, Preprocess, load_image, preprocess

SOURCE_VARIANT = "device-fp32"
INT8_VARIANT = "device-int8"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT_TYPES = ("int8", "uint8")
CALIBRATION_CHUNK = 16
"""Photos whose intermediate outputs are held at once during calibration (memory stays bounded)."""
STEM_NAMES = re.compile(r"/_conv_stem/|/_blocks\.(?P<block>\d+)/")
"""Where the trunk's stem nodes are, by the names torch gives them in the exported graph."""
HEAD_OPS = ("MatMul", "Gemm", "Conv")
"""The last node of one of these types ends the trunk; what follows (L2 normalisation) stays in float."""

log = logging.getLogger(__name__)


class QuantizeError(RuntimeError):
    """Quantisation that cannot be done: no device file, no usable calibration photo, a broken graph."""


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantise: calibration method, integer types, per-channel weights, what stays float.

    The default (uint8 activations, int8 weights of 7 bits) is the one that is both fast and accurate on
    every CPU: x86 cores without VNNI (AVX2 only, like the benchmark machines) multiply uint8 x int8 in
    16-bit pairs that saturate with full 8-bit weights. Measured on EfficientNet-Lite0@160 frozen features:
    cosine to fp32 0.97 with 7-bit weights against 0.90 with 8-bit ones; uint8 weights (0.99) run three
    times slower than fp32 there. On ARM or VNNI devices `reduce_range=False` keeps the 8th bit.
    """

    calibrate_method: str = "minmax"
    activations: str = "uint8"
    weights: str = "int8"
    reduce_range: bool = True
    per_channel: bool = True
    pre_process: bool = True
    keep_output_float: bool = True
    float_blocks: int = 0
    """Keep the trunk's stem convolution and its first `float_blocks` blocks in float: the layers nearest the photo
    lose the most to int8 (edge-v3 on the open-world pool photos: README, "On the device")."""
    check_photos: int = 16
    """Photos (of the calibration set) on which the int8 file is compared with fp32 after writing it."""

    def __post_init__(self) -> None:
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise QuantizeError(f"calibrate_method must be one of {CALIBRATION_METHODS}, "
                                f"got {self.calibrate_method!r}")
        if self.float_blocks < 0:
            raise QuantizeError(f"float_blocks counts trunk blocks, got {self.float_blocks}")
        for name in ("activations", "weights"):
            if getattr(self, name) not in INT_TYPES:
                raise QuantizeError(f"{name} must be one of {INT_TYPES}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class QuantizeResult:
    """What was written and how close it stays to fp32 on real photos."""

    model_id: str
    file: str
    sha256: str
    size_bytes: int
    fp32_size_bytes: int
    calibration_photos: int
    skipped_photos: list[str]
    cosine_mean: float
    cosine_min: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


class PhotoCalibrationReader:
    """Real photos, decoded and preprocessed as the manifest says, fed one at a time (batch 1).

    Implements onnxruntime's `CalibrationDataReader` protocol with ranges (`__len__`, `set_range`,
    `get_next`, `rewind`), so calibration runs in chunks of `CALIBRATION_CHUNK` photos and holds the
    intermediate outputs of one chunk at a time. Unreadable photos are skipped and remembered; the photos
    are trimmed to a whole number of chunks (onnxruntime needs that).
    """

    def __init__(self, photos: Sequence[Path], spec: Preprocess, input_name: str) -> None:
        self.input_name = input_name
        self.skipped: dict[str, str] = {}
        arrays = []
        for photo in photos:
            try:
                arrays.append(preprocess(load_image(photo), spec)[None])
            except ImageError as err:
                self.skipped[str(photo)] = str(err)
        self.chunk = min(CALIBRATION_CHUNK, len(arrays)) or 1
        self.arrays = arrays[:len(arrays) - len(arrays) % self.chunk]
        self._start, self._end, self._next = 0, len(self.arrays), 0

    def __len__(self) -> int:
        return len(self.arrays)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._next = start_index, min(end_index, len(self.arrays)), start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {self.input_name: self.arrays[self._next - 1]}

    def rewind(self) -> None:
        self._next = self._start


def quantize_model(release_dir: str | Path, model_id: str, photos: Sequence[Path],
                   config: QuantizeConfig | None = None) -> QuantizeResult:
    """Quantise `model_id`'s device-fp32 file to int8, check it against fp32 and register `device-int8`."""
    from models.release import Release, sha256_file

    config = config or QuantizeConfig()
    if not photos:
        raise QuantizeError("no calibration photos given")
    started = time.perf_counter()
    release = Release.load(release_dir, verify=True)
    entry = release.manifest.model(model_id)
    if SOURCE_VARIANT not in entry.variants:
        raise QuantizeError(f"model {model_id!r} has no {SOURCE_VARIANT!r} variant (the batch-1 device file); "
                            f"its variants: {sorted(entry.variants) or 'none'}")
    source = release.path(model_id, SOURCE_VARIANT)
    target = source.parent / f"{model_id}.{INT8_VARIANT}.onnx"
    reader = PhotoCalibrationReader(photos, entry.preprocess, entry.input)
    if not len(reader):
        raise QuantizeError(f"none of the {len(photos)} calibration photos could be read; e.g. "
                            f"{next(iter(reader.skipped.values()))}")
    _quantize_file(source, target, reader, config)
    cosines = _compare(release.encoder(model_id, SOURCE_VARIANT, threads=None), target, entry, photos, config)
    result = QuantizeResult(
        model_id=model_id, file=target.name, sha256=sha256_file(target), size_bytes=target.stat().st_size,
        fp32_size_bytes=source.stat().st_size, calibration_photos=len(reader),
        skipped_photos=sorted(reader.skipped), cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()), seconds=time.perf_counter() - started, config=asdict(config),
    )
    register_variant(release.folder, result)
    return result


def register_variant(release_dir: str | Path, result: QuantizeResult) -> None:
    """Add (or replace) the `device-int8` variant of a model in the manifest, with a note in its card."""
    manifest = Manifest.load(release_dir)
    entry = manifest.model(result.model_id)
    variants = {**entry.variants, INT8_VARIANT: ModelFile(result.file, result.sha256, batch=1, precision="int8")}
    note = {"calibration_photos": result.calibration_photos, "cosine_to_fp32_mean": round(result.cosine_mean, 6),
            "cosine_to_fp32_min": round(result.cosine_min, 6), "format": "QDQ", **result.config}
    card = {**entry.card, "quantization": note}
    models = {**manifest.models, entry.id: replace(entry, variants=variants, card=card)}
    Manifest(spaces=manifest.spaces, models=models, release=manifest.release).save(release_dir)


def _quantize_file(source: Path, target: Path, reader: PhotoCalibrationReader, config: QuantizeConfig) -> None:
    """Pre-process (shape inference, graph optimisation), then quantise to a temporary file and rename it."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    with tempfile.TemporaryDirectory(prefix="concord-quant-", dir=target.parent) as tmp:
        model_path = Path(tmp) / "prepared.onnx"
        _prepare(source, model_path, config.pre_process)
        model = onnx.load(str(model_path))
        _name_nodes(model)
        onnx.save(model, str(model_path))
        exclude = (_float_nodes(model) if config.keep_output_float else []) + (
            _stem_nodes(model, config.float_blocks) if config.float_blocks else [])
        partial = Path(tmp) / target.name
        try:
            # CalibStridedMinMax: calibrate chunk by chunk (any method), merging ranges, so memory stays
            # bounded; CalibMaxIntermediateOutputs would drop all but the last partial chunk (onnxruntime 1.32)
            quantize_static(
                str(model_path), str(partial), reader, quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel, reduce_range=config.reduce_range,
                activation_type=types[config.activations], weight_type=types[config.weights],
                nodes_to_exclude=exclude, calibrate_method=methods[config.calibrate_method],
                extra_options={"CalibStridedMinMax": reader.chunk},
            )
        except Exception as err:
            raise QuantizeError(f"{source.name}: onnxruntime could not quantise this graph: {err}") from err
        _fsync(partial)
        os.replace(partial, target)


def _prepare(source: Path, out: Path, pre_process: bool) -> None:
    """Run onnxruntime's quantisation pre-processing (ONNX shape inference + graph optimisation)."""
    if pre_process:
        from onnxruntime.quantization import quant_pre_process

        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
            return
        except Exception as err:  # an optional pass: quantising the graph as exported still works
            log.warning("quantisation pre-processing failed on %s (%s); quantising it as exported", source, err)
    out.write_bytes(source.read_bytes())


def _name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name: exclusion lists work by node name."""
    taken = {node.name for node in model.graph.node if node.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _float_nodes(model: Any) -> list[str]:
    """Names of the nodes kept in float: the space's photo fingerprint (a colour histogram that int8 would
    blur, and that must match the cloud's bit for bit in practice), and every node after the semantic head's
    last MatMul/Gemm/Conv (the output normalisation and assembly)."""
    nodes = list(model.graph.node)
    fingerprint = {node.name for node in nodes if "fingerprint" in node.name}
    last = max((i for i, node in enumerate(nodes) if node.op_type in HEAD_OPS and node.name not in fingerprint),
               default=None)
    tail = [] if last is None else [node.name for node in nodes[last + 1:]]
    return sorted(fingerprint | set(tail))


def _stem_nodes(model: Any, blocks: int) -> list[str]:
    """Names of the trunk's stem convolution and first `blocks` blocks (every trunk's, when joined)."""
    stem = [node.name for node in model.graph.node
            if (found := STEM_NAMES.search(node.name)) and (found["block"] is None or int(found["block"]) < blocks)]
    if not stem:
        raise QuantizeError("float_blocks: this graph has no trunk stem (no '_conv_stem' or '_blocks.N' nodes)")
    return stem


def _compare(fp32: Any, int8_path: Path, entry: Any, photos: Sequence[Path], config: QuantizeConfig) -> np.ndarray:
    """Cosine between fp32 and int8 embeddings of a few of the calibration photos."""
    from models.runtime import OnnxEncoder

    int8 = OnnxEncoder(int8_path, entry, threads=None)
    images: list[Image.Image] = []
    for photo in photos:
        if len(images) == config.check_photos:
            break
        try:
            images.append(load_image(photo))
        except ImageError:
            continue
    a, b = fp32.encode_images(images), int8.encode_images(images)
    norms = np.linalg.norm(b, axis=1)
    if not np.all(np.isfinite(b)) or np.any(np.abs(norms - 1.0) > 1e-3):
        raise QuantizeError(f"{int8_path.name}: the int8 graph gives non-unit or non-finite embeddings "
                            f"(norms {norms.min():.4f}..{norms.max():.4f})")
    return np.asarray(np.sum(a * b, axis=1), dtype=np.float64)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
