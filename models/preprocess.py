"""Photo decoding and preprocessing, implemented once (numpy + Pillow) and driven by manifest data.

Training, export, the edge client and the server all call these functions, so a model sees the same
tensor wherever it runs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000
"""Photos above this many pixels are refused before decoding (decompression-bomb guard)."""

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """A photo that cannot be used: empty, not an image, truncated, too large or of an odd mode."""


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the model input: resize the short side, centre-crop, scale to value_range."""

    resize: int
    crop: int
    interpolation: str = "bicubic"
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if not (0 < self.crop <= self.resize):
            raise ValueError(f"preprocess needs 0 < crop <= resize, got crop={self.crop} resize={self.resize}")
        if tuple(self.value_range) != (0.0, 1.0):
            raise ValueError(f"preprocess.value_range must be [0, 1] (the ONNX contract), got {self.value_range}")

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["value_range"] = list(self.value_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocess:
        """Build from manifest data; a missing or mistyped key raises ValueError naming it."""
        try:
            value_range = data.get("value_range", [0.0, 1.0])
            return cls(
                resize=int(data["resize"]),  # type: ignore[call-overload]
                crop=int(data["crop"]),  # type: ignore[call-overload]
                interpolation=str(data.get("interpolation", "bicubic")),
                value_range=(float(value_range[0]), float(value_range[1])),  # type: ignore[index]
            )
        except KeyError as err:
            raise ValueError(f"preprocess is missing the key {err.args[0]!r}") from None
        except (TypeError, IndexError) as err:
            raise ValueError(f"preprocess has a field of the wrong type: {err}") from None


def load_image(source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a photo to RGB, upright per its EXIF orientation; refuse bad input with ImageError."""
    name = "photo" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a folder, not a photo") from None
    if not data:
        raise ImageError(f"{name}: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} is {width * height:,} pixels, above the limit "
                                 f"of {max_pixels:,} (decompression-bomb guard)")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a copy would double a large photo's memory
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(f"{name}: refused as a decompression bomb ({err})") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name}: not a photo in a format Pillow can read") from None
        except OSError as err:
            raise ImageError(f"{name}: the photo is corrupt or truncated ({err})") from None
    return to_rgb(image, name)


STRIP_ROWS = 512
"""Rows converted at a time by `to_rgb`: a large photo's conversion holds the source, the RGB result and one strip."""


def to_rgb(image: Image.Image, name: str = "photo") -> Image.Image:
    """Convert any common mode to RGB; transparent areas become white (strip by strip: per-pixel, same result)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        return _by_strips(image, _on_white)
    if image.mode in ("L", "P", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        return image.convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        top = float(image.getextrema()[1]) or 1.0  # type: ignore[arg-type]
        return _by_strips(image, lambda strip: _scaled(strip, top))
    raise ImageError(f"{name}: unsupported image mode {image.mode!r}")


def _on_white(strip: Image.Image) -> Image.Image:
    rgba = strip.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled(strip: Image.Image, top: float) -> Image.Image:
    array = np.asarray(strip, dtype=np.float64)
    return Image.fromarray((array / top * 255.0).astype(np.uint8)).convert("RGB")


def _by_strips(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (a per-pixel conversion to RGB) applied to STRIP_ROWS rows at a time, pasted into one RGB image."""
    width, height = image.size
    if height <= STRIP_ROWS:
        return convert(image)
    out = Image.new("RGB", image.size)
    for top in range(0, height, STRIP_ROWS):
        out.paste(convert(image.crop((0, top, width, min(height, top + STRIP_ROWS)))), (0, top))
    return out


def preprocess(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB photo -> float32 array [3, crop, crop] in [0, 1]: resize short side, centre crop."""
    image = to_rgb(image)
    width, height = image.size
    scale = spec.resize / min(width, height)
    new_size = (max(spec.crop, round(width * scale)), max(spec.crop, round(height * scale)))
    resized = image.resize(new_size, INTERPOLATIONS[spec.interpolation])
    left = (new_size[0] - spec.crop) // 2
    top = (new_size[1] - spec.crop) // 2
    cropped = resized.crop((left, top, left + spec.crop, top + spec.crop))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess_batch(images: list[Image.Image], spec: Preprocess) -> np.ndarray:
    """Stack preprocessed photos into the model input [N, 3, crop, crop]."""
    if not images:
        return np.zeros((0, 3, spec.crop, spec.crop), dtype=np.float32)
    return np.stack([preprocess(image, spec) for image in images])
