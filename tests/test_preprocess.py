"""One preprocessing everywhere: the training path (torch) and the runtime path (numpy -> onnxruntime) see the
same tensor and the same embedding for real photos of several sizes and modes; bad input is refused by name."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from models.preprocess import ImageError, Preprocess, load_image, preprocess
from models.runtime import OnnxEncoder
from tests.export_helpers import small_encoder, train_config
from training.arch import Encoder
from training.cache import _load_view
from training.convert import to_onnx
from training.export import model_entry

RESOLUTION = 64
ORIENTATION = 0x0112


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgba_photo() -> Image.Image:
    """chelsea (451x300) whose left quarter is fully transparent and the rest half-transparent to opaque."""
    rgba = Image.fromarray(data.chelsea()).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width).astype(np.uint8), (rgba.height, 1))
    alpha[:, : rgba.width // 4] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def exif_rotated(image: Image.Image) -> bytes:
    """A JPEG stored turned 90° counter-clockwise, with EXIF orientation 6 (turn 90° clockwise to display)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return encoded(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


PHOTOS = {
    "rgb.jpg": lambda: encoded(Image.fromarray(data.astronaut()), "JPEG", quality=90),  # 512x512
    "grey.png": lambda: encoded(Image.fromarray(data.camera()), "PNG"),  # L, 512x512
    "rgba.png": lambda: encoded(rgba_photo(), "PNG"),  # 451x300 with transparency
    "cmyk.jpg": lambda: encoded(Image.fromarray(data.coffee()).convert("CMYK"), "JPEG", quality=95),  # 600x400
    "exif.jpg": lambda: exif_rotated(Image.fromarray(data.rocket())),  # 640x427 once upright
    "palette.gif": lambda: encoded(Image.fromarray(data.chelsea()).convert("P"), "GIF"),
    "small.png": lambda: encoded(Image.fromarray(data.hubble_deep_field()[:25, :40]), "PNG"),  # upscaled
    "deep16.png": lambda: encoded(Image.fromarray(data.camera().astype(np.uint16) * 257), "PNG"),  # I;16
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name, make in PHOTOS.items():
        (folder / name).write_bytes(make())
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, sample_photos: dict[str, bytes]) -> tuple[Encoder, OnnxEncoder]:
    """A small Lite0 encoder in torch and its ONNX export run by the runtime, preprocessing from the manifest."""
    encoder = small_encoder(RESOLUTION, 5, list(sample_photos.values()))
    entry = model_entry(train_config("edge-v1", "edge", 1, RESOLUTION, []))
    path = to_onnx(encoder, tmp_path_factory.mktemp("onnx") / entry.file, RESOLUTION)
    return encoder, OnnxEncoder(path, entry)


def test_training_and_runtime_paths_give_the_same_tensor(photo_dir: Path, models: tuple[Encoder, OnnxEncoder]) -> None:
    spec = models[1].preprocess
    assert spec == Preprocess(resize=RESOLUTION, crop=RESOLUTION, interpolation="bicubic")
    for name in PHOTOS:
        training = torch.from_numpy(_load_view(photo_dir, name, spec, "plain"))
        runtime = preprocess(load_image((photo_dir / name).read_bytes()), spec)
        assert runtime.dtype == np.float32 and runtime.shape == (3, RESOLUTION, RESOLUTION), name
        assert runtime.min() >= 0.0 and runtime.max() <= 1.0, name
        assert np.array_equal(training.numpy(), runtime), name


def test_torch_on_the_training_tensor_matches_onnx_on_the_runtime_path(photo_dir: Path,
                                                                        models: tuple[Encoder, OnnxEncoder]) -> None:
    encoder, onnx_encoder = models
    names = list(PHOTOS)
    batch = torch.stack([torch.from_numpy(_load_view(photo_dir, n, onnx_encoder.preprocess, "plain")) for n in names])
    with torch.no_grad():
        want = encoder(batch).numpy()
    got = onnx_encoder.encode_bytes([(photo_dir / n).read_bytes() for n in names])
    cosines = (want * got).sum(axis=1)
    assert cosines.min() >= 0.9999, dict(zip(names, cosines.round(6), strict=True))
    assert (got @ got.T)[np.triu_indices(len(names), 1)].min() < 0.95  # distinct photos, distinct embeddings


def test_load_image_makes_upright_rgb_of_every_mode(photo_dir: Path) -> None:
    images = {name: load_image(photo_dir / name) for name in PHOTOS}
    assert all(image.mode == "RGB" for image in images.values())
    assert Image.open(photo_dir / "exif.jpg").size == (427, 640)  # stored on its side ...
    assert images["exif.jpg"].size == (640, 427)  # ... and turned upright by its EXIF orientation
    upright = np.asarray(images["exif.jpg"], dtype=np.float32)
    assert np.abs(upright - np.asarray(Image.fromarray(data.rocket()), dtype=np.float32)).mean() < 4
    grey = np.asarray(images["grey.png"])
    assert np.array_equal(grey[..., 0], data.camera()) and np.array_equal(grey[..., 0], grey[..., 2])
    rgba = np.asarray(images["rgba.png"])
    assert (rgba[:, : 451 // 4] == 255).all()  # transparent areas become white
    assert np.array_equal(rgba[:, -1], data.chelsea()[:, -1])  # opaque areas keep their colour
    cmyk = np.asarray(images["cmyk.jpg"], dtype=np.float32)
    assert images["cmyk.jpg"].size == (600, 400) and np.abs(cmyk - data.coffee()).mean() < 8
    assert images["small.png"].size == (40, 25) and images["deep16.png"].size == (512, 512)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims `width` x `height` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def test_bad_input_is_refused_naming_the_problem(tmp_path: Path, sample_photos: dict[str, bytes]) -> None:
    jpeg = sample_photos["chelsea"]
    png = encoded(Image.fromarray(data.chelsea()), "PNG")
    garbled = bytearray(png)
    garbled[len(png) // 2: len(png) // 2 + 256] = bytes(256)
    files = {"empty.jpg": b"", "notes.txt": b"shopping list: milk, eggs", "truncated.jpg": jpeg[: len(jpeg) // 2],
             "corrupt.png": bytes(garbled), "bomb.png": png_header(100_000, 100_000),
             "large.png": png_header(8_000, 8_000)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    expected = {"empty.jpg": "the file is empty", "notes.txt": "not a photo in a format Pillow can read",
                "truncated.jpg": "corrupt or truncated", "corrupt.png": "corrupt or truncated",
                "bomb.png": "decompression bomb", "large.png": "64,000,000 pixels, above the limit of 40,000,000"}
    for name, message in expected.items():
        with pytest.raises(ImageError, match=rf"{tmp_path / name}: .*{message}"):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"photo: 451x300 is 135,300 pixels, above the limit of 100,000"):
        load_image(jpeg, max_pixels=100_000)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "F"])
def test_conversion_by_strips_gives_the_same_pixels_as_whole(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large photos convert to RGB a strip at a time (bounded memory); the pixels are those of a whole conversion."""
    import models.preprocess as module

    rng = np.random.default_rng(7)
    arrays = {"RGBA": rng.integers(0, 256, (70, 30, 4), dtype=np.uint8),
              "LA": rng.integers(0, 256, (70, 30, 2), dtype=np.uint8),
              "I;16": rng.integers(0, 60_000, (70, 30), dtype=np.uint16),
              "F": rng.random((70, 30), dtype=np.float32)}
    image = Image.fromarray(arrays[mode]) if mode in ("I;16", "F") else Image.fromarray(arrays[mode], mode=mode)
    assert image.mode == mode
    whole = np.asarray(module.to_rgb(image))
    monkeypatch.setattr(module, "STRIP_ROWS", 16)
    assert np.array_equal(np.asarray(module.to_rgb(image)), whole)
