"""A space's photo fingerprint in the manifest: parsed, checked field by field, round-tripped; absent stays valid."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from models.manifest import Fingerprint, Manifest, ManifestError

SHA = "0" * 64
FINGERPRINT = {"dims": 128, "weight": 0.02, "duplicate_weight": 0.98, "kind": "colour-layout-v1"}


def manifest_dict(fingerprint: Any = None, dim: int = 384) -> dict[str, Any]:
    """A small valid manifest: one space (with `fingerprint` when given) and one cloud model in it."""
    space: dict[str, Any] = {"id": "concord", "dim": dim, "metric": "inner_product"}
    if fingerprint is not None:
        space["fingerprint"] = fingerprint
    model = {"id": "cloud-v1", "role": "cloud", "space": "concord", "dim": dim, "version": 1, "parents": [],
             "file": "cloud-v1.onnx", "sha256": SHA, "preprocess": {"resize": 64, "crop": 64}}
    return {"schema": 1, "release": "r", "spaces": [space], "models": [model]}


def test_a_fingerprint_is_parsed_and_round_trips() -> None:
    data = manifest_dict(FINGERPRINT)
    manifest = Manifest.from_dict(data)
    assert manifest.spaces["concord"].fingerprint == Fingerprint(128, 0.02, 0.98, "colour-layout-v1")
    again = manifest.to_dict()
    assert again["spaces"][0]["fingerprint"] == FINGERPRINT
    assert Manifest.from_dict(again) == Manifest.from_dict(copy.deepcopy(again))
    assert Manifest.from_dict(again).spaces == manifest.spaces


def test_the_kind_defaults_and_a_space_without_fingerprint_stays_valid() -> None:
    bare = {k: v for k, v in FINGERPRINT.items() if k != "kind"}
    assert Manifest.from_dict(manifest_dict(bare)).spaces["concord"].fingerprint == Fingerprint(128, 0.02, 0.98)
    old = Manifest.from_dict(manifest_dict(None, dim=256))
    assert old.spaces["concord"].fingerprint is None
    assert "fingerprint" not in old.to_dict()["spaces"][0]  # an old release is written back as it was


@pytest.mark.parametrize(("change", "message"), [
    ({"dims": 0}, r"spaces\[0\]\.fingerprint\.dims: must be a positive integer"),
    ({"dims": 384}, r"spaces\[0\]\.fingerprint\.dims: must be smaller than the space's dim 384"),
    ({"dims": 1.5}, r"spaces\[0\]\.fingerprint\.dims: expected int"),
    ({"weight": 0}, r"spaces\[0\]\.fingerprint\.weight: must be a number strictly between 0 and 1"),
    ({"weight": 1.0}, r"spaces\[0\]\.fingerprint\.weight: must be a number strictly between 0 and 1"),
    ({"weight": True}, r"spaces\[0\]\.fingerprint\.weight: must be a number"),
    ({"duplicate_weight": "0.98"}, r"spaces\[0\]\.fingerprint\.duplicate_weight: must be a number"),
    ({"duplicate_weight": -0.5}, r"spaces\[0\]\.fingerprint\.duplicate_weight: must be a number"),
    ({"kind": 3}, r"spaces\[0\]\.fingerprint\.kind: expected str"),
])
def test_a_wrong_fingerprint_field_is_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(manifest_dict({**FINGERPRINT, **change}))


def test_a_missing_field_or_a_non_object_is_named() -> None:
    with pytest.raises(ManifestError, match=r"spaces\[0\]\.fingerprint: missing the field 'duplicate_weight'"):
        Manifest.from_dict(manifest_dict({"dims": 128, "weight": 0.02}))
    with pytest.raises(ManifestError, match=r"spaces\[0\]\.fingerprint: expected dict"):
        Manifest.from_dict(manifest_dict([128]))
