"""The ONNX encoder runtime on the tiny release: it reproduces torch, batches, loops a batch-1 graph, and checks
its file against the manifest."""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.manifest import ModelEntry
from models.preprocess import ImageError, Preprocess, load_image, preprocess
from models.release import Release
from models.runtime import EncoderError, OnnxEncoder
from tests.conftest import TINY_MODELS, TinyEncoder


def torch_model(model_id: str) -> TinyEncoder:
    _, _, _, _, _, seed, drift = next(m for m in TINY_MODELS if m[0] == model_id)
    return TinyEncoder(seed, drift).eval()


@pytest.fixture(scope="module")
def release(tiny_release: Path) -> Release:
    return Release.load(tiny_release)


@pytest.fixture(scope="module")
def photos(sample_photos: dict[str, bytes]) -> list[bytes]:
    return list(sample_photos.values())


@pytest.mark.parametrize("model_id, variant", [("cloud-v2", "server"), ("edge-v2", "device-fp32")])
def test_onnx_reproduces_torch_on_real_photos(release: Release, photos: list[bytes], model_id: str,
                                              variant: str) -> None:
    encoder = release.encoder(model_id, variant)
    got = encoder.encode_bytes(photos)
    spec = release.manifest.model(model_id).preprocess
    with torch.no_grad():
        want = torch_model(model_id)(torch.from_numpy(np.stack([preprocess(load_image(p), spec) for p in photos])))
    assert got.dtype == np.float32 and got.shape == (len(photos), encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want.numpy()).sum(axis=1).min() >= 0.9999


def test_batching_and_the_batch1_device_graph_give_the_same_embeddings(tiny_release: Path, release: Release,
                                                                       photos: list[bytes]) -> None:
    entry = release.manifest.model("edge-v1")
    images = [load_image(p) for p in photos]
    whole = release.encoder("edge-v1").encode_images(images)
    small_batches = OnnxEncoder(release.path("edge-v1"), entry, batch_size=4).encode_images(images)
    device = release.encoder("edge-v1", "device-fp32")
    assert device.fixed_batch == 1
    looped = device.encode_images(images)
    np.testing.assert_allclose(small_batches, whole, atol=1e-5)
    np.testing.assert_allclose(looped, whole, atol=1e-5)
    assert device.encode_arrays(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, entry.dim)
    assert device.encode_images([]).shape == (0, entry.dim)


class RecordingSession:
    """A stand-in session with a fixed batch of 3 that records the batches it is given."""

    batch = 3

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.seen: list[int] = []

    def run(self, images: np.ndarray) -> np.ndarray:
        self.seen.append(len(images))
        out = np.zeros((len(images), self.dim), np.float32)
        out[:, 0] = images.mean(axis=(1, 2, 3))
        return out


def test_a_fixed_batch_graph_gets_only_full_batches_and_padding_is_dropped(release: Release) -> None:
    entry = release.manifest.model("cloud-v1")
    session = RecordingSession(entry.dim)
    encoder = OnnxEncoder("stand-in.onnx", entry, session=session)
    images = np.stack([np.full((3, 64, 64), i / 10, np.float32) for i in range(7)])
    out = encoder.encode_arrays(images)
    assert session.seen == [3, 3, 3] and out.shape == (7, entry.dim)
    np.testing.assert_allclose(out[:, 0], np.arange(7) / 10, atol=1e-6)


def test_a_session_returning_the_wrong_shape_is_an_error(release: Release) -> None:
    entry = release.manifest.model("cloud-v1")
    encoder = OnnxEncoder("stand-in.onnx", entry, session=RecordingSession(entry.dim + 1))
    with pytest.raises(EncoderError, match=r"returned shape \[3, 33\] for 3 images; the manifest says dim 32"):
        encoder.encode_arrays(np.zeros((2, 3, 64, 64), np.float32))


def test_input_of_the_wrong_shape_is_refused(release: Release) -> None:
    with pytest.raises(ValueError, match=r"takes float32 \[N, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        release.encoder("cloud-v1").encode_arrays(np.zeros((2, 3, 32, 32), np.float32))


@pytest.mark.parametrize("change, message", [
    ({"dim": 16}, r"output 'embedding' has shape \['batch', 32\], the manifest says dim 16"),
    ({"output": "features"}, r"the graph's outputs are \['embedding'\], the manifest says 'features'"),
    ({"input": "pixels"}, r"the graph's inputs are \['image'\], the manifest says \['pixels'\]"),
    ({"preprocess": Preprocess(48, 48)}, r"input 'image' has shape \[1, 3, 32, 32\], .* \[N, 3, 48, 48\]"),
])
def test_a_file_that_differs_from_its_manifest_entry_is_refused(release: Release, change: dict[str, Any],
                                                                message: str) -> None:
    variant = "device-fp32" if "preprocess" in change else "server"
    entry: ModelEntry = dataclasses.replace(release.manifest.model("edge-v1"), **change)
    with pytest.raises(EncoderError, match=message):
        OnnxEncoder(release.path("edge-v1", variant), entry)


def test_a_file_that_is_not_onnx_is_refused(release: Release, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(EncoderError, match=r"file bad\.onnx: onnxruntime cannot load it"):
        OnnxEncoder(bad, release.manifest.model("cloud-v1"))
    with pytest.raises(EncoderError, match="no such file"):
        OnnxEncoder(tmp_path / "gone.onnx", release.manifest.model("cloud-v1"))


def test_bad_photo_bytes_are_named_by_index(release: Release, photos: list[bytes]) -> None:
    with pytest.raises(ImageError, match=r"photo #1: photo: the file is empty"):
        release.encoder("cloud-v1").encode_bytes([photos[0], b""])
    with pytest.raises(ImageError, match=r"photo #0: .*not a photo"):
        release.encoder("cloud-v1").encode_bytes([b"hello, world"])


def test_one_encoder_serves_several_threads(release: Release, photos: list[bytes]) -> None:
    encoder = release.encoder("cloud-v2", threads=1)
    want = encoder.encode_bytes(photos)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = encoder.encode_bytes(photos[i % 2:])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        np.testing.assert_allclose(got, want[i % 2:], atol=1e-6)


def test_any_pillow_image_mode_is_encoded(release: Release, photos: list[bytes]) -> None:
    rgb = load_image(photos[0])
    encoder = release.encoder("cloud-v1")
    grey = encoder.encode_images([rgb.convert("L")])
    buffer = io.BytesIO()
    rgb.convert("L").save(buffer, format="PNG")
    np.testing.assert_allclose(encoder.encode_bytes([buffer.getvalue()]), grey, atol=1e-5)
    assert isinstance(rgb, Image.Image)
