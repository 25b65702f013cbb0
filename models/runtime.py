"""The ONNX encoder runtime (onnxruntime + numpy + Pillow): photos in, L2-normalised embeddings out.

`OnnxEncoder` runs one model file of a release. It checks at load that the file's input/output names,
input size and output dim are the ones its manifest entry declares, batches large inputs, and loops
over a fixed batch-1 device graph. An onnxruntime session may be called from several threads at once,
so one encoder serves a whole server process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from models.manifest import ModelEntry
from models.preprocess import ImageError, Preprocess, load_image, preprocess


class EncoderError(ValueError):
    """A model file that cannot be loaded or does not match its manifest entry."""


class EncoderSession(Protocol):
    """The session boundary: float32 [N, 3, H, W] images in, float32 [N, dim] embeddings out.

    `OrtSession` implements it with onnxruntime; tests may pass any object with this `run`.
    """

    def run(self, images: np.ndarray) -> np.ndarray: ...


class OrtSession:
    """An onnxruntime `InferenceSession` of one encoder graph, with the facts the encoder checks."""

    def __init__(self, model: str | bytes, input_name: str, output_name: str, threads: int | None = None,
                 name: str = "model") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime picks one thread per core
        options.inter_op_num_threads = 1
        # no busy-waiting between ops: concurrent requests each running a session would spin against each other
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise EncoderError(f"{name}: onnxruntime cannot load it ({err})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if list(inputs) != [input_name]:
            raise EncoderError(f"{name}: the graph's inputs are {list(inputs)}, the manifest says [{input_name!r}]")
        if output_name not in outputs:
            raise EncoderError(f"{name}: the graph's outputs are {list(outputs)}, the manifest says {output_name!r}")
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape: list[Any] = list(inputs[input_name].shape)
        self.output_shape: list[Any] = list(outputs[output_name].shape)
        first = self.input_shape[0] if self.input_shape else None
        self.batch: int | None = first if isinstance(first, int) and first > 0 else None
        """The graph's fixed batch size (1 for device files), None when the batch is dynamic."""

    def run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: images})
        return np.asarray(out)


class OnnxEncoder:
    """One model file of a release as an image encoder; thread-safe."""

    def __init__(self, path: str | Path, entry: ModelEntry, threads: int | None = None, batch_size: int = 16, *,
                 sha256: str | None = None, session: EncoderSession | None = None) -> None:
        """Load `path` for `entry`; with `sha256`, refuse a file whose bytes hash differently.

        `session` replaces onnxruntime (tests); then `path` is only a name and nothing is read.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.entry = entry
        self.model_id = entry.id
        self.dim = entry.dim
        self.preprocess: Preprocess = entry.preprocess
        self.batch_size = batch_size
        name = f"model {entry.id!r} file {self.path.name}"
        if session is None:
            session = OrtSession(self._read(name, sha256), entry.input, entry.output, threads, name)
            self._check_shapes(session, name)
        self.session = session
        fixed = getattr(session, "batch", None)
        self.fixed_batch: int | None = fixed if isinstance(fixed, int) else None
        """The graph's fixed batch size (a device file: 1), None for a dynamic batch."""

    def _read(self, name: str, sha256: str | None) -> bytes:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise EncoderError(f"{name}: no such file at {self.path}") from None
        if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
            raise EncoderError(f"{name}: sha256 {actual} differs from the manifest's {sha256}; refusing the file")
        return data

    def _check_shapes(self, session: OrtSession, name: str) -> None:
        crop = self.preprocess.crop
        shape = session.input_shape
        if len(shape) != 4 or any(isinstance(s, int) and s != want for s, want in zip(shape[1:], (3, crop, crop),
                                                                                         strict=True)):
            raise EncoderError(f"{name}: input {self.entry.input!r} has shape {shape}, the manifest's "
                               f"preprocess gives [N, 3, {crop}, {crop}]")
        out = session.output_shape
        if len(out) != 2 or (isinstance(out[1], int) and out[1] != self.dim):
            raise EncoderError(f"{name}: output {self.entry.output!r} has shape {out}, the manifest says "
                               f"dim {self.dim}")

    def encode_arrays(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images float32 [N, 3, H, W] in [0, 1] -> unit-norm embeddings float32 [N, dim]."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        crop = self.preprocess.crop
        if images.ndim != 4 or images.shape[1:] != (3, crop, crop):
            raise ValueError(f"model {self.model_id!r} takes float32 [N, 3, {crop}, {crop}], got {list(images.shape)}")
        step = self.fixed_batch or self.batch_size
        chunks = [self._run(images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        count = len(chunk)
        if self.fixed_batch and count < self.fixed_batch:  # pad the last chunk of a fixed-batch graph
            pad = np.zeros((self.fixed_batch - count, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        out = np.asarray(self.session.run(chunk), dtype=np.float32)
        if out.shape != (len(chunk), self.dim):
            raise EncoderError(f"model {self.model_id!r} returned shape {list(out.shape)} for {len(chunk)} "
                               f"images; the manifest says dim {self.dim}")
        return out[:count]

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded photos (any mode) -> embeddings [N, dim], preprocessed by the manifest's spec."""
        step = max(self.fixed_batch or 0, self.batch_size)
        chunks = []
        for i in range(0, len(images), step):
            batch = np.stack([preprocess(image, self.preprocess) for image in images[i:i + step]])
            chunks.append(self.encode_arrays(batch))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def encode_bytes(self, datas: Sequence[bytes]) -> np.ndarray:
        """Encoded photo files (JPEG, PNG, ...) -> embeddings; a bad photo raises ImageError naming its index."""
        step = max(self.fixed_batch or 0, self.batch_size)
        chunks = []
        for start in range(0, len(datas), step):
            images = []
            for i, data in enumerate(datas[start:start + step], start):
                try:
                    images.append(load_image(data))
                except ImageError as err:
                    raise ImageError(f"photo #{i}: {err}") from None
            chunks.append(self.encode_images(images))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.model_id!r}, file={self.path.name!r}, dim={self.dim})"
