"""Near-duplicates of a photo: the copies a photo library accumulates (cropped, resized, re-compressed).

Shared by the near-duplicate benchmark (`concord neardup`), the demo, and the fitting of the space's
photo fingerprint, which must learn to see through exactly these changes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Transform:
    """How a near-duplicate is made: crop (keeping >= `keep` of each side), resize, JPEG re-encode."""

    keep: float = 0.8
    scale: tuple[float, float] = (0.5, 0.9)
    quality: tuple[int, int] = (50, 70)

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be 0 < low <= high, got {self.scale}")
        if not 1 <= self.quality[0] <= self.quality[1] <= 100:
            raise ValueError(f"quality must be 1 <= low <= high <= 100, got {self.quality}")

    def describe(self) -> str:
        return (f"crop keeping {self.keep:.0%}-100% of each side (centre or random offset), resize "
                f"{self.scale[0]:g}-{self.scale[1]:g}x (bicubic), JPEG quality {self.quality[0]}-{self.quality[1]}")


def near_duplicate(image: Image.Image, rng: np.random.Generator, transform: Transform = Transform()
                   ) -> tuple[bytes, dict[str, Any]]:
    """A cropped, resized, JPEG re-encoded copy of `image` (RGB), and the parameters drawn for it."""
    width, height = image.size
    keep_w, keep_h = (float(rng.uniform(transform.keep, 1.0)) for _ in range(2))
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    centre = bool(rng.random() < 0.5)
    if centre:
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    else:
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    scale = float(rng.uniform(*transform.scale))
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    quality = int(rng.integers(transform.quality[0], transform.quality[1] + 1))
    params = {"crop": [left, top, crop_w, crop_h], "crop_mode": "centre" if centre else "offset",
              "kept": [round(keep_w, 4), round(keep_h, 4)], "scale": round(scale, 4), "quality": quality,
              "size": list(size)}
    return recompress(image, (left, top, left + crop_w, top + crop_h), size, quality), params


def recompress(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], quality: int) -> bytes:
    """JPEG bytes of `image` cropped to `box` (left, top, right, bottom) and resized to `size` (bicubic)."""
    small = image.crop(box).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
