"""`concord neardup`: near-duplicates keep to their bounds, and finding the original is scored correctly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.neardup import Transform, near_duplicate
from models.preprocess import load_image
from server.neardup import NeardupConfig, run_neardup, scores
from tests.caltech_helpers import make_caltech


def test_near_duplicates_stay_within_their_bounds(sample_photos: dict[str, bytes]) -> None:
    image = load_image(sample_photos["chelsea"])
    rng = np.random.default_rng(0)
    transform = Transform()
    for _ in range(20):
        data, params = near_duplicate(image, rng, transform)
        left, top, width, height = params["crop"]
        assert width >= 0.8 * image.width - 1 and height >= 0.8 * image.height - 1
        assert 0 <= left <= image.width - width and 0 <= top <= image.height - height
        assert 0.5 <= params["scale"] <= 0.9 and 50 <= params["quality"] <= 70
        assert Image.open(io.BytesIO(data)).size == tuple(params["size"])
    with pytest.raises(ValueError, match="keep"):
        Transform(keep=0)


def test_scores_count_the_original_or_its_byte_twin() -> None:
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0.1, 0, 0], [0.9, 1, 0, 0], [0, 0, 0.2, 1]], dtype=np.float32)
    originals = np.array([0, 0, 2])
    twins = [{0}, {0, 1}, {2}]  # query 1's original has a byte-identical copy at 1: its top hit counts
    found = scores(queries, gallery, originals, twins)
    assert found["recall@1"] == pytest.approx(2 / 3) and found["recall@5"] == 1.0
    assert found["hit@1"] == [True, True, False] and found["misses@1"] == 1


def test_neardup_report_on_a_small_dataset(tiny_release: Path, tmp_path: Path) -> None:
    data = make_caltech(tmp_path / "caltech", classes=3, train=1, test=4, background=(0, 3))
    exact = Transform(keep=1.0, scale=(1.0, 1.0), quality=(100, 100))  # a copy: every model must find its original
    config = NeardupConfig(release=tiny_release, data=data, out=tmp_path / "out", cache=tmp_path / "cache",
                           queries=6, seed=1, transform=exact, threads=1)
    result = run_neardup(config)
    rows = {r["query_model"]: r for r in result["results"]}
    assert list(rows) == ["edge-v2", "edge-v1", "cloud-v2", "cloud-v1"]
    assert rows["cloud-v1"]["recall@1"] == 1.0 and rows["cloud-v1"]["median_rank"] == 1.0
    assert rows["cloud-v1"]["control"]["recall@1"] == 1.0  # the original itself, by the gallery's own model
    assert rows["edge-v2"]["variant"] == "device-fp32" and rows["cloud-v2"]["variant"] == "server"
    assert result["protocol"]["gallery"] == 15 and len(result["queries"]) == 6
    assert result["target"]["measured"] == rows["edge-v2"]["recall@1"]
    assert json.loads((tmp_path / "out" / "neardup.json").read_text())["results"] == result["results"]
    assert "Recall@1" in (tmp_path / "out" / "neardup.md").read_text()
    assert len(list((tmp_path / "cache").glob("gallery-cloud-v1-*.npy"))) == 1

    harder = run_neardup(NeardupConfig(release=tiny_release, data=data, out=tmp_path / "out2",
                                       cache=tmp_path / "cache", queries=6, seed=1, threads=1))
    params = harder["queries"][0]
    assert 50 <= params["quality"] <= 70 and all(k >= 0.8 for k in params["kept"])
    assert all(0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0 for r in harder["results"])
