"""`concord neardup`: near-duplicates keep to their bounds, and finding the original is scored correctly."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edge.bench.neardup import NeardupConfig, run_neardup, scores
from models.benchmark.transforms import Transform, near_duplicate
from models.preprocess import load_image
from tests.caltech_helpers import make_caltech
from tests.conftest import TINY_FINGERPRINT


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


EXACT = Transform(keep=1.0, scale=(1.0, 1.0), quality=(100, 100))
"""A plain copy: every model must find its original."""


def run_small(release: Path, tmp_path: Path, name: str, transform: Transform = EXACT) -> dict[str, Any]:
    data = make_caltech(tmp_path / "caltech", classes=3, train=1, test=4, background=(0, 3))
    return run_neardup(NeardupConfig(release=release, data=data, out=tmp_path / name, cache=tmp_path / "cache",
                                     queries=6, seed=1, transform=transform, threads=1))


def test_neardup_without_a_fingerprint_runs_similar_and_says_so(tiny_release: Path, tmp_path: Path) -> None:
    result = run_small(tiny_release, tmp_path, "out")
    rows = {(r["query_model"], r["match"]): r for r in result["results"]}
    models = ["edge-v2", "edge-v1", "cloud-v2", "cloud-v1"]
    assert list(rows) == [(m, match) for m in models for match in ("duplicate", "similar")] + [
        ("edge-v2", "fingerprint alone")]
    for model in models:
        duplicate = rows[model, "duplicate"]
        assert not duplicate["available"] and "no photo fingerprint" in duplicate["reason"]
    assert not rows["edge-v2", "fingerprint alone"]["available"]
    similar = rows["cloud-v1", "similar"]
    assert similar["recall@1"] == 1.0 and similar["median_rank"] == 1.0
    assert similar["control"]["recall@1"] == 1.0  # the original itself, by the gallery's own model
    assert rows["edge-v2", "similar"]["variant"] == "device-fp32" and rows["cloud-v2", "similar"]["variant"] == "server"
    assert result["protocol"]["gallery"] == 15 and len(result["queries"]) == 6
    assert result["protocol"]["fingerprint"] is None
    target = result["target"]
    assert target["match"] == "similar" and target["measured"] == rows["edge-v2", "similar"]["recall@1"]
    assert json.loads((tmp_path / "out" / "neardup.json").read_text())["results"] == result["results"]
    text = (tmp_path / "out" / "neardup.md").read_text()
    assert "Recall@1" in text and "carries no photo fingerprint" in text
    assert "| edge-v2 | device-fp32 | cloud-v1 | duplicate | space 'tiny' has no photo fingerprint" in text
    assert len(list((tmp_path / "cache").glob("gallery-cloud-v1-*.npy"))) == 1

    harder = run_small(tiny_release, tmp_path, "out2", Transform())
    params = harder["queries"][0]
    assert 50 <= params["quality"] <= 70 and all(k >= 0.8 for k in params["kept"])
    assert all(0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0 for r in harder["results"] if r["available"])


def test_neardup_scores_both_matches_and_the_fingerprint_alone(fingerprinted_release: Path, tmp_path: Path) -> None:
    result = run_small(fingerprinted_release, tmp_path, "out", Transform())
    rows = {(r["query_model"], r["match"]): r for r in result["results"]}
    assert all(r["available"] for r in rows.values()) and len(rows) == 9
    target = result["target"]
    assert (target["query_model"], target["match"]) == ("edge-v2", "duplicate")
    assert target["measured"] == rows["edge-v2", "duplicate"]["recall@1"]
    assert result["protocol"]["fingerprint"] == vars(TINY_FINGERPRINT)
    for r in rows.values():
        assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0
    # the fingerprint is the same for every model, so it finds exact copies by itself
    exact = run_small(fingerprinted_release, tmp_path, "exact")
    alone = next(r for r in exact["results"] if r["match"] == "fingerprint alone")
    assert alone["recall@1"] == 1.0 and alone["mean_cosine_to_original"] == pytest.approx(1.0, abs=1e-3)
    text = (tmp_path / "out" / "neardup.md").read_text()
    assert "| edge-v2 | device-fp32 | cloud-v1 | fingerprint alone |" in text
    assert "in `duplicate` match" in text and "colour-layout descriptor" in text
    assert set(result["queries"][0]) >= {"edge-v2 duplicate", "edge-v2 similar", "edge-v2 fingerprint alone"}
