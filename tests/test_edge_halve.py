"""Half-size cloud files: weights stored as fp16, computed in fp32, checked on photos and shipped by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.halve import FP16_VARIANT
from models.manifest import Manifest
from models.preprocess import load_image
from models.release import Release
from tests.edge_helpers import copy_release, run_cli, write_photos


def test_a_halved_cloud_file_keeps_the_embeddings_and_ships_by_default(
        tiny_release: Path, sample_photos: dict[str, bytes], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    release = copy_release(tiny_release, tmp_path)
    photos = write_photos(sample_photos, tmp_path / "photos")
    check = ["--check", str(tmp_path / "photos")]
    code, out, err = run_cli(["halve", "cloud-v2", "--release", str(release), *check], capsys)
    assert code == 0, err
    assert "registered as server-fp16" in out
    entry = Manifest.load(release).model("cloud-v2")
    halved = release / entry.variants[FP16_VARIANT].file
    assert halved.stat().st_size < 0.6 * (release / entry.file).stat().st_size
    types = {init.data_type for init in onnx.load(str(halved)).graph.initializer if len(init.dims) > 1}
    assert onnx.TensorProto.FLOAT16 in types

    code, _, err = run_cli(["ship", "--release", str(release), "--out", str(tmp_path / "ship")], capsys)
    assert code == 0, err
    shipped, full = Release.load(tmp_path / "ship"), Release.load(release)
    assert shipped.manifest.model("cloud-v2").file == halved.name
    assert shipped.manifest.model("cloud-v1").file == full.manifest.model("cloud-v1").file
    images = [load_image(p) for p in photos]
    a = full.encoder("cloud-v2").encode_images(images)
    b = shipped.encoder("cloud-v2").encode_images(images)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999


def test_halving_an_unknown_model_is_one_clear_line(tiny_release: Path, sample_photos: dict[str, bytes],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = copy_release(tiny_release, tmp_path)
    write_photos(sample_photos, tmp_path / "photos")
    check = ["--check", str(tmp_path / "photos")]
    code, _, err = run_cli(["halve", "cloud-v9", "--release", str(release), *check], capsys)
    assert code == 1
    assert "cloud-v9" in err and "Traceback" not in err
