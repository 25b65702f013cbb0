"""Which file of an edge model a device runs when the user does not say: int8 if present."""

from __future__ import annotations

from models.manifest import ModelEntry

DEVICE_VARIANTS = ("device-int8", "device-fp32")
"""Preferred order of the files a device runs; `server` (dynamic batch fp32) is the last resort."""


def device_variant(entry: ModelEntry) -> str:
    """The file a device should run: device-int8, else device-fp32, else the server file."""
    return next((name for name in DEVICE_VARIANTS if name in entry.variants), "server")
