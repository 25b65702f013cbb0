"""The open-world split reader and the leave-one-out retrieval it is measured with, on data the tests make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.benchmark.metrics import evaluate_retrieval, ranked_relevance
from models.benchmark.open_world import data_root, load_open_world
from tests.caltech_helpers import make_open_world


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_reader_splits_by_category_with_per_split_labels(tmp_path: Path) -> None:
    world = load_open_world(make_open_world(tmp_path, pool=2, evaluation=3, photos=4))
    assert len(world.pool) == 8 and len(world.eval) == 12
    assert world.eval_classes == tuple(sorted(world.eval_classes)) and len(world.eval_classes) == 3
    assert set(world.pool_classes).isdisjoint(world.eval_classes)
    assert world.eval.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert all((world.image_dir / p).is_file() for p in world.all_paths())
    assert len(world.all_paths()) == 20


def test_reader_refuses_shared_categories_and_names_a_missing_folder(tmp_path: Path) -> None:
    root = make_open_world(tmp_path / "a")
    pool = (root / "pool.txt").read_text()
    (root / "eval.txt").write_text((root / "eval.txt").read_text() + pool.splitlines()[0] + "\n")
    (root / "categories_eval.txt").write_text((root / "categories_eval.txt").read_text()
                                              + pool.splitlines()[0].split("/")[0] + "\n")
    with pytest.raises(ValueError, match="share no category"):
        load_open_world(root)
    with pytest.raises(FileNotFoundError, match="CONCORD_OPEN_DATA"):
        load_open_world(tmp_path / "nowhere")


def test_reader_refuses_a_photo_of_an_unlisted_category(tmp_path: Path) -> None:
    root = make_open_world(tmp_path)
    (root / "categories_eval.txt").write_text("\n".join((root / "categories_eval.txt").read_text().split()[1:]))
    with pytest.raises(ValueError, match=r"not in categories_eval\.txt"):
        load_open_world(root)


def test_data_root_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONCORD_OPEN_DATA", str(tmp_path))
    assert data_root() == tmp_path and data_root("elsewhere") == Path("elsewhere")


def test_leave_one_out_ignores_each_querys_own_photo() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    photos = unit(rng.normal(size=(20, 8)) + 3 * np.eye(8)[labels])
    relevance = ranked_relevance(photos, photos, labels, labels, exclude_self=True)
    sims = photos @ photos.T
    np.fill_diagonal(sims, -np.inf)
    expected = (labels[np.argsort(-sims, axis=1, kind="stable")] == labels[:, None])
    expected[:, -1] = False  # the photo itself, ranked last
    np.testing.assert_array_equal(relevance, expected)
    assert relevance.sum(axis=1).tolist() == [3] * 20
    # without leave-one-out every query finds itself first
    assert evaluate_retrieval(photos, photos, labels, labels, np.zeros(20, bool)).overall.recall_at_1 == 1.0


def test_leave_one_out_across_two_models_drops_the_shared_photo() -> None:
    labels = np.array([0, 0, 1, 1])
    gallery = unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]]))
    queries = unit(gallery + np.array([0.05, 0.0]))  # another model's vectors of the same photos
    # each query's own photo is its nearest gallery vector; left out, the next one decides
    result = evaluate_retrieval(queries, gallery, labels, labels, np.zeros(4, bool), exclude_self=True)
    assert result.hits_at_1.tolist() == [True, False, True, False]
    assert result.overall.recall_at_1 == 0.5
    with pytest.raises(ValueError, match="one query per gallery photo"):
        ranked_relevance(gallery[:3], gallery, labels[:3], labels, exclude_self=True)


def test_a_release_is_measured_on_the_open_world_photos_as_it_ships(tiny_release: Path, tmp_path: Path) -> None:
    """`concord evaluate-release`: the release's own ONNX files encode every eval photo; the report judges only
    pairs of models the release holds (no baselines) and a second run reads the cached embeddings."""
    import json

    from training.benchmark import open_world_protocol
    from training.evaluate.release import evaluate_release

    root = make_open_world(tmp_path / "world", pool=2, evaluation=3, photos=4)
    written = evaluate_release(tiny_release, open_world_protocol(), tmp_path / "out", tmp_path / "cache", root)
    report = json.loads(written["json"].read_text())
    assert report["data"]["queries"] == 12 and report["data"]["leave_one_out"] is True
    pairs = {(row["query"], row["gallery"]) for row in report["matrix"]}
    assert ("cloud-v2", "cloud-v1") in pairs and ("edge-v2", "cloud-v2") in pairs
    assert all("independent" not in q and "l2" not in g for q, g in pairs), "a release ships no baselines"
    assert [u["new"] for u in report["upgrades"]] == ["cloud-v2", "edge-v2"]
    assert all(0.0 <= row["overall"]["recall@1"] <= 1.0 for row in report["matrix"])
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 4
    again = evaluate_release(tiny_release, open_world_protocol(), tmp_path / "again", tmp_path / "cache", root)
    assert json.loads(again["json"].read_text())["matrix"] == report["matrix"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached


def test_a_release_against_the_one_devices_run_now_reports_what_each_renewed_file_changes(
        tiny_release: Path, sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    """`concord evaluate-release --previous`: the edge model whose device file changed (edge-v2, int8 before, its
    fp32 device file now) gets a row per cloud gallery; an unchanged one (edge-v1) gets none."""
    import json

    from edge.photos import list_photos
    from edge.quantize import quantize_model
    from tests.edge_helpers import copy_release, write_photos
    from training.benchmark import open_world_protocol
    from training.evaluate.release import evaluate_release

    previous = copy_release(tiny_release, tmp_path / "previous")
    quantize_model(previous, "edge-v2", list_photos(write_photos(sample_photos, tmp_path / "photos")[0].parent))
    root = make_open_world(tmp_path / "world", pool=2, evaluation=3, photos=4)
    written = evaluate_release(tiny_release, open_world_protocol(), tmp_path / "out", tmp_path / "cache", root,
                               previous=previous)
    rows = json.loads(written["json"].read_text())["renewals"]
    assert [(r["model"], r["gallery"]) for r in rows] == [("edge-v2", "cloud-v1"), ("edge-v2", "cloud-v2")]
    for row in rows:
        assert row["recall@1"] - row["recall@1_previous"] == pytest.approx(row["pfr"] - row["nfr"])
    assert "## Renewed device files" in written["markdown"].read_text()
    unchanged = evaluate_release(tiny_release, open_world_protocol(), tmp_path / "same", tmp_path / "cache", root,
                                 previous=tiny_release)
    assert json.loads(unchanged["json"].read_text())["renewals"] == []
    assert "No edge model's device file changed." in unchanged["markdown"].read_text()
