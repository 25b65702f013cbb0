"""Which model and which file a device uses when the user does not say: the newest edge, int8 if present."""

from __future__ import annotations

import os
from pathlib import Path

import models
from models.manifest import Manifest, ModelEntry

DEVICE_VARIANTS = ("device-int8", "device-fp32")
"""Preferred order of the files a device runs; `server` (dynamic batch fp32) is the last resort."""


SHIPPED_RELEASE = Path(models.__file__).resolve().parent / "release"
"""The release shipped inside the package (the server's default too)."""


def release_dir(path: str | Path | None) -> Path:
    """The release folder: the argument, else $CONCORD_RELEASE, else the shipped `models/release`."""
    return Path(path or os.environ.get("CONCORD_RELEASE") or SHIPPED_RELEASE)


def newest(manifest: Manifest, role: str) -> ModelEntry:
    """The model of `role` with the highest version."""
    entries = [entry for entry in manifest.models.values() if entry.role == role]
    if not entries:
        raise KeyError(f"the release holds no {role} model; it holds {sorted(manifest.models)}")
    return max(entries, key=lambda entry: entry.version)


def device_variant(entry: ModelEntry) -> str:
    """The file a device should run: device-int8, else device-fp32, else the server file."""
    return next((name for name in DEVICE_VARIANTS if name in entry.variants), "server")


def cloud_of(manifest: Manifest, edge: ModelEntry) -> ModelEntry:
    """The cloud model an edge model pairs with: its cloud parent of the same version, else the newest cloud
    parent, else the newest cloud model of its space."""
    parents = [manifest.model(p) for p in edge.parents if manifest.model(p).role == "cloud"]
    same = [p for p in parents if p.version == edge.version]
    if same or parents:
        return max(same or parents, key=lambda entry: entry.version)
    clouds = [e for e in manifest.models.values() if e.role == "cloud" and e.space == edge.space]
    if not clouds:
        raise KeyError(f"no cloud model shares the space {edge.space!r} of {edge.id!r}")
    return max(clouds, key=lambda entry: entry.version)
