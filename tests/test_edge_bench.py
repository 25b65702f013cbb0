"""The device benchmark (timing report) and the int8 accuracy report, on the tiny release and tiny data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.bench.accuracy import run_accuracy
from edge.bench.device import BenchConfig, run_bench
from edge.photos import list_photos
from edge.quantize import QuantizeConfig, quantize_model
from models.benchmark.caltech import load_split
from models.manifest import Manifest
from tests.edge_helpers import copy_release, run_cli, write_photos


@pytest.fixture(scope="module")
def release_int8(tiny_release: Path, sample_photos: dict[str, bytes],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    release = copy_release(tiny_release, tmp)
    quantize_model(release, "edge-v2", list_photos(write_photos(sample_photos, tmp / "photos")[0].parent))
    return release


@pytest.fixture(scope="module")
def tiny_caltech(sample_photos: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset laid out like Caltech-101: one class per sample photo (crops of it) and a background."""
    root = tmp_path_factory.mktemp("caltech")
    train, test = [], []
    for name, data in sample_photos.items():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        folder = root / "101_ObjectCategories" / name
        folder.mkdir(parents=True)
        w, h = image.size
        for i in range(5):
            box = (i * w // 20, i * h // 25, w - (4 - i) * w // 20, h - (4 - i) * h // 25)
            crop = image.crop(box).transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else image.crop(box)
            crop.save(folder / f"image_{i:04d}.jpg", quality=85)
            (train if i < 3 else test).append(f"{name}/image_{i:04d}.jpg")
    background = root / "101_ObjectCategories" / "BACKGROUND_Google"
    background.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(background / f"image_{i:04d}.jpg")
        (train if i < 2 else test).append(f"BACKGROUND_Google/image_{i:04d}.jpg")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root


def test_device_bench_times_all_three_and_writes_its_report(release_int8: Path, sample_photos: dict[str, bytes],
                                                            tmp_path: Path) -> None:
    photo = write_photos(sample_photos, tmp_path / "p")[0]
    result = run_bench(release_int8, photo, BenchConfig(rounds=6, warmup=2), tmp_path / "reports")
    names = [row["name"] for row in result["models"]]
    assert names == ["edge fp32", "edge int8", "cloud fp32"]
    shapes = {row["name"]: row["input_shape"] for row in result["models"]}
    assert shapes == {"edge fp32": [1, 3, 32, 32], "edge int8": [1, 3, 32, 32], "cloud fp32": [1, 3, 64, 64]}
    for row in result["models"]:
        assert row["latency_ms"]["runs"] == 6
        assert 0 < row["latency_ms"]["min"] <= row["latency_ms"]["median"] <= row["latency_ms"]["p90"]
        assert row["size_bytes"] == (release_int8 / row["file"]).stat().st_size
    by = {row["name"]: row for row in result["models"]}
    assert result["ratios"]["size_int8_edge_over_cloud"] == pytest.approx(
        by["edge int8"]["size_bytes"] / by["cloud fp32"]["size_bytes"])
    assert result["ratios"]["latency_int8_edge_over_cloud"] == pytest.approx(
        by["edge int8"]["latency_ms"]["median"] / by["cloud fp32"]["latency_ms"]["median"])
    saved = json.loads((tmp_path / "reports" / "device_bench.json").read_text())
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["cpu"]
    assert saved["versions"]["onnxruntime"] and saved["config"]["threads"] == 1
    markdown = (tmp_path / "reports" / "device_bench.md").read_text()
    assert "| edge int8 |" in markdown and "latency_int8_edge_over_cloud" in markdown


def test_device_bench_command_prints_the_table(tiny_release: Path, sample_photos: dict[str, bytes],
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = write_photos(sample_photos, tmp_path / "p")[1]
    code, out, err = run_cli(["device-bench", "--release", str(tiny_release), "--photo", str(photo),
                              "--rounds", "3", "--warmup", "1", "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "edge fp32" in out and "cloud fp32" in out and "edge int8" not in out  # not quantised here
    assert (tmp_path / "r" / "device_bench.md").is_file()


def test_accuracy_report_compares_int8_and_fp32_on_the_cloud_gallery(
        release_int8: Path, tiny_caltech: Path, tmp_path: Path) -> None:
    split = load_split(tiny_caltech)
    assert len(split.gallery) == 20 and len(split.queries) == 12  # background kept in gallery only
    cache = tmp_path / "cache"
    result = run_accuracy(release_int8, data=tiny_caltech, cache_dir=cache, out_dir=tmp_path / "r")
    assert (result["edge"], result["cloud"]) == ("edge-v2", "cloud-v2")
    for variant in ("device-fp32", "device-int8"):
        figures = result["figures"][variant]
        assert figures["overall"]["queries"] == figures["old"]["queries"] == 12  # six classes, all among the first 50
        assert figures["new"] == {"recall@1": None, "recall@5": None, "map": None, "queries": 0}
        assert 0.0 <= figures["overall"]["map"] <= 1.0
        assert figures["overall"]["recall@1"] <= figures["overall"]["recall@5"]
    agreement = result["int8_vs_fp32"]
    assert agreement["cosine_mean"] > 0.98
    assert agreement["recall@1_change"] == pytest.approx(
        agreement["positive_flip_rate"] - agreement["negative_flip_rate"])
    markdown = (tmp_path / "r" / "device_accuracy.md").read_text()
    assert markdown.count("| edge-v2 device-") == 6 and "| new | 0 | - | - | - |" in markdown
    cached = sorted(cache.glob("*.npy"))
    assert len(cached) == 3  # the cloud gallery and two query sets
    gallery = np.load(next(p for p in cached if p.name.startswith("gallery-cloud-v2")))
    assert gallery.shape == (20, 32)
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = run_accuracy(release_int8, data=tiny_caltech, cache_dir=cache, out_dir=None)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read from the cache, not re-encoded
    assert again["figures"] == result["figures"]


def test_accuracy_against_the_previous_int8_file_says_what_renewing_it_changes(
        release_int8: Path, tiny_caltech: Path, sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    """A release whose int8 file was quantised otherwise (per-tensor weights) stands for the one devices run now."""
    previous = copy_release(release_int8, tmp_path / "previous")
    photos = write_photos(sample_photos, tmp_path / "photos")
    quantize_model(previous, "edge-v2", photos, QuantizeConfig(per_channel=False))
    cache = tmp_path / "cache"
    result = run_accuracy(release_int8, data=tiny_caltech, cache_dir=cache, out_dir=tmp_path / "r", previous=previous)
    change = result["int8_vs_previous"]
    assert 0.9 < change["cosine_mean"] < 1.0  # another file, of the same model
    assert change["recall@1_change"] == pytest.approx(
        result["figures"]["device-int8"]["overall"]["recall@1"]
        - result["figures"]["previous device-int8"]["overall"]["recall@1"])
    renewed = Manifest.load(release_int8).model("edge-v2").variants["device-int8"].sha256
    assert result["previous"]["sha256"] == Manifest.load(previous).model("edge-v2").variants["device-int8"].sha256
    assert result["previous"]["sha256"] != renewed
    assert "what its users see change" in (tmp_path / "r" / "device_accuracy.md").read_text()
    same = run_accuracy(release_int8, data=tiny_caltech, cache_dir=cache, out_dir=None, previous=release_int8)
    assert same["int8_vs_previous"]["same_top1"] == 1.0 and same["int8_vs_previous"]["negative_flip_rate"] == 0.0


def test_accuracy_against_a_previous_release_without_that_int8_file_is_refused(
        release_int8: Path, tiny_release: Path, tiny_caltech: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="holds no device-int8 file of 'edge-v2'"):
        run_accuracy(release_int8, data=tiny_caltech, cache_dir=tmp_path / "cache", out_dir=None,
                     previous=tiny_release)
