"""Choose real photos for calibration and benchmarks: from a folder or from a list file of paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PhotoSourceError(ValueError):
    """A folder or list of photos that cannot be used (missing, empty, naming files that are absent)."""


def list_photos(source: str | Path, count: int | None = None, root: str | Path | None = None) -> list[Path]:
    """Photos from a folder (searched recursively) or a list file (one path a line), `count` spread evenly.

    Relative lines of a list file resolve against `root`, else the list's folder, else the one sub-folder of
    the list's folder that holds them (Caltech-101's `train.txt` names photos under `101_ObjectCategories/`).
    """
    source = Path(source)
    if source.is_dir():
        photos = photos_in(source)
        if not photos:
            raise PhotoSourceError(f"{source}: no photos ({', '.join(PHOTO_SUFFIXES)}) in this folder")
    elif source.is_file():
        photos = _read_list(source, Path(root) if root is not None else None)
    else:
        raise PhotoSourceError(f"{source}: no such folder or list file")
    return spread(photos, count)


def photos_in(folder: Path) -> list[Path]:
    """Every photo file under `folder` (by suffix, any case, recursively), sorted so runs go in the same order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def spread(items: list[Path], count: int | None) -> list[Path]:
    """`count` items evenly spaced over the list (all of them when count is None or larger)."""
    if count is not None and count <= 0:
        raise PhotoSourceError(f"count must be positive, got {count}")
    if count is None or count >= len(items):
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in picks]


def _read_list(path: Path, root: Path | None) -> list[Path]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise PhotoSourceError(f"{path}: the list names no photos")
    base = root if root is not None else _guess_base(path.parent, names[0])
    photos = [Path(name) if Path(name).is_absolute() else base / name for name in names]
    missing = [p for p in photos if not p.is_file()]
    if missing:
        raise PhotoSourceError(f"{path}: {len(missing)} of {len(photos)} listed photos are missing, "
                               f"e.g. {missing[0]} (relative lines resolve against {base}; pass a root)")
    return photos


def _guess_base(folder: Path, first: str) -> Path:
    if Path(first).is_absolute() or (folder / first).is_file():
        return folder
    holders = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and (sub / first).is_file()]
    return holders[0] if len(holders) == 1 else folder
