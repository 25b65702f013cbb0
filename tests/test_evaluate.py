"""The benchmark report on small synthetic embeddings: class centroids plus noise.

Every photo has a latent vector (its class centroid plus its own noise); a model encodes it as the
latent plus model noise. Compatible models share the latent space (cloud-v1 is noisier, the old
model; cloud-v2 cleaner), an independent model is a random rotation of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.benchmark.metrics import evaluate_retrieval, flip_rates
from training.evaluate import (
    DevicePair,
    FlipPair,
    Labels,
    MixedSpec,
    ModelEmbeddings,
    Protocol,
    TaxPair,
    UpgradePair,
    build_report,
    manifest_metrics,
    markdown_report,
    markdown_table,
    write_report,
)

CLASSES, DIM, OLD_CLASSES = 12, 24, 6
PHOTO_NOISE, V1_NOISE, V2_NOISE, EDGE_NOISE = 0.7, 1.2, 0.3, 0.02


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_labels() -> Labels:
    queries = np.repeat(np.arange(CLASSES), 6)
    gallery = np.concatenate([np.repeat(np.arange(CLASSES), 10), np.full(20, -1)])
    return Labels(queries, gallery, queries < OLD_CLASSES)


def latents(labels: np.ndarray, centroids: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(scale=PHOTO_NOISE, size=(len(labels), DIM))
    out = np.where(labels[:, None] >= 0, centroids[np.maximum(labels, 0)], 0.0) + noise
    return out


def encode(latent: np.ndarray, noise: float, seed: int, rotation: np.ndarray | None = None) -> np.ndarray:
    x = latent + np.random.default_rng(seed).normal(scale=noise, size=latent.shape)
    return unit(x if rotation is None else x @ rotation)


def make_models() -> tuple[list[ModelEmbeddings], Labels]:
    labels = make_labels()
    centroids = np.random.default_rng(1).normal(size=(CLASSES, DIM))
    zq, zg = latents(labels.queries, centroids, 2), latents(labels.gallery, centroids, 3)
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(DIM, DIM)))

    def cloud(model_id: str, version: int, noise: float, seed: int, group: str = "main",
              rot: np.ndarray | None = None) -> ModelEmbeddings:
        return ModelEmbeddings(model_id, "cloud", version, encode(zq, noise, seed, rot),
                               encode(zg, noise, seed + 1, rot), group)

    def edge(model_id: str, of: ModelEmbeddings, seed: int, rot: np.ndarray | None = None) -> ModelEmbeddings:
        """An edge model: its cloud model's query vectors, slightly perturbed."""
        return ModelEmbeddings(model_id, "edge", of.version, encode(of.queries, EDGE_NOISE, seed, rot))

    v1, v2 = cloud("cloud-v1", 1, V1_NOISE, 10), cloud("cloud-v2", 2, V2_NOISE, 20)
    models = [v1, edge("edge-v1", v1, 30), v2, edge("edge-v2", v2, 40),
              cloud("cloud-v2-independent", 2, V2_NOISE, 50, "independent", rotation),
              cloud("cloud-v2-l2", 2, V2_NOISE, 60, "l2"), edge("edge-broken", v2, 70, rotation)]
    return models, labels


@pytest.fixture(scope="module")
def bench() -> tuple[list[ModelEmbeddings], Labels]:
    return make_models()


PROTOCOL = Protocol(
    upgrades=(UpgradePair("cloud-v2", "cloud-v1", ("cloud-v1",)), UpgradePair("edge-v2", "edge-v1", ("cloud-v1",)),
              UpgradePair("cloud-v2-independent", "cloud-v1", ("cloud-v1",)),
              UpgradePair("cloud-v2-l2", "cloud-v1", ("cloud-v1",))),
    cross_device=(DevicePair("edge-v1", "cloud-v1"), DevicePair("edge-v2", "cloud-v2"),
                  DevicePair("edge-broken", "cloud-v2")),
    tax=TaxPair("cloud-v2-independent", "cloud-v2"),
    flips=(FlipPair("cloud-v1", "cloud-v2", "cloud-v1"), FlipPair("edge-v1", "edge-v2", "cloud-v1")),
    mixed=MixedSpec("cloud-v1", "cloud-v2", ("cloud-v2", "edge-v1", "edge-v2"), seed=7),
)


@pytest.fixture(scope="module")
def report(bench: tuple[list[ModelEmbeddings], Labels]) -> dict[str, Any]:
    return build_report(*bench, PROTOCOL)


def cell(report: dict[str, Any], query: str, gallery: str, metric: str = "recall@1") -> float:
    row = next(r for r in report["matrix"] if (r["query"], r["gallery"]) == (query, gallery))
    return float(row["overall"][metric])


def test_report_is_strict_json(report: dict[str, Any]) -> None:
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["data"] == {"queries": 72, "old_queries": 36, "new_queries": 36, "gallery": 140,
                              "distractors": 20, "leave_one_out": False}


def test_matrix_figures_match_a_direct_search(report: dict[str, Any],
                                              bench: tuple[list[ModelEmbeddings], Labels]) -> None:
    models, labels = bench
    by_id = {m.id: m for m in models}
    gallery = by_id["cloud-v1"].gallery
    assert gallery is not None
    direct = evaluate_retrieval(by_id["edge-v2"].queries, gallery, labels.queries, labels.gallery,
                                labels.old_queries)
    row = next(r for r in report["matrix"] if (r["query"], r["gallery"]) == ("edge-v2", "cloud-v1"))
    assert row["overall"]["recall@1"] == pytest.approx(direct.overall.recall_at_1)
    assert row["old"]["map"] == pytest.approx(direct.old.map)
    assert row["new"]["recall@5"] == pytest.approx(direct.new.recall_at_5)
    assert row["case"] == "new/old" and not row["baseline"]


def test_matrix_covers_main_pairs_and_tags_baselines(report: dict[str, Any]) -> None:
    pairs = {(r["query"], r["gallery"]) for r in report["matrix"]}
    clouds = ["cloud-v1", "cloud-v2", "cloud-v2-independent", "cloud-v2-l2"]
    for q in ["cloud-v1", "edge-v1", "cloud-v2", "edge-v2"]:
        assert {(q, g) for g in clouds} <= pairs
    assert ("cloud-v2-independent", "cloud-v1") in pairs
    assert ("cloud-v2-independent", "cloud-v2-l2") not in pairs
    assert all(r["baseline"] for r in report["matrix"] if "independent" in (r["query_group"], r["gallery_group"]))


def test_compatible_models_search_each_other_and_independent_collapses(report: dict[str, Any]) -> None:
    assert cell(report, "cloud-v2", "cloud-v1") > 0.75
    assert cell(report, "edge-v2", "cloud-v1") > 0.75
    chance = 1 / CLASSES
    assert cell(report, "cloud-v2-independent", "cloud-v2-independent") > 0.8
    assert cell(report, "cloud-v2-independent", "cloud-v1") < chance + 0.15
    assert cell(report, "cloud-v1", "cloud-v2-independent") < chance + 0.15


def test_ecc_verdicts_and_ac(report: dict[str, Any]) -> None:
    verdicts = {(r["new"], r["gallery"]): r for r in report["ecc"]}
    compatible = verdicts["cloud-v2", "cloud-v1"]
    assert compatible["pass"] and compatible["recall@1"]["pass"] and compatible["map"]["pass"]
    assert compatible["recall@1"]["new"] == pytest.approx(cell(report, "cloud-v2", "cloud-v1"))
    assert compatible["recall@1"]["replaced"] == pytest.approx(cell(report, "cloud-v1", "cloud-v1"))
    assert verdicts["edge-v2", "cloud-v1"]["pass"]
    assert not verdicts["cloud-v2-independent", "cloud-v1"]["pass"]
    assert report["ac"] == {"group": "main", "passed": 2, "pairs": 2, "value": 1.0}
    baseline = next(u for u in report["upgrades"] if u["new"] == "cloud-v2-independent")
    assert baseline["group"] == "independent" and not baseline["pass"]


def test_ac_counts_a_failing_main_upgrade(bench: tuple[list[ModelEmbeddings], Labels]) -> None:
    protocol = Protocol(upgrades=(UpgradePair("cloud-v2", "cloud-v1", ("cloud-v1",)),
                                  UpgradePair("cloud-v1", "cloud-v2", ("cloud-v2",))))
    report = build_report(*bench, protocol)
    assert report["ac"]["passed"] == 1 and report["ac"]["value"] == pytest.approx(0.5)


def test_cross_device_gap(report: dict[str, Any]) -> None:
    gaps = {r["edge"]: r for r in report["cross_device"]}
    v1 = gaps["edge-v1"]
    assert v1["gap"] == pytest.approx(cell(report, "cloud-v1", "cloud-v1") - cell(report, "edge-v1", "cloud-v1"))
    assert v1["pass"] and gaps["edge-v2"]["pass"]
    assert not gaps["edge-broken"]["pass"] and gaps["edge-broken"]["gap"] > 0.5


def test_compatibility_tax(report: dict[str, Any]) -> None:
    tax = report["tax"]
    for metric in ("recall@1", "map"):
        expected = cell(report, "cloud-v2-independent", "cloud-v2-independent", metric) - cell(
            report, "cloud-v2", "cloud-v2", metric)
        assert tax[metric]["tax"] == pytest.approx(expected)


def test_flip_rates_identity(report: dict[str, Any], bench: tuple[list[ModelEmbeddings], Labels]) -> None:
    for row in report["flips"]:
        change = row["recall@1_b"] - row["recall@1_a"]
        assert change == pytest.approx(row["overall"]["pfr"] - row["overall"]["nfr"])
    row = report["flips"][0]
    assert row["recall@1_a"] == pytest.approx(cell(report, "cloud-v1", "cloud-v1"))
    assert row["recall@1_b"] == pytest.approx(cell(report, "cloud-v2", "cloud-v1"))
    models, labels = bench
    by_id = {m.id: m for m in models}
    gallery = by_id["cloud-v1"].gallery
    assert gallery is not None
    a, b = (evaluate_retrieval(by_id[m].queries, gallery, labels.queries, labels.gallery, labels.old_queries)
            for m in ("cloud-v1", "cloud-v2"))
    old = labels.old_queries
    assert (row["old"]["nfr"], row["old"]["pfr"]) == pytest.approx(flip_rates(a.hits_at_1[old], b.hits_at_1[old]))


def test_mixed_gallery_ends_equal_the_pure_galleries(report: dict[str, Any]) -> None:
    mixed = report["mixed"]
    assert mixed["shares"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for curve in mixed["curves"]:
        q = curve["query"]
        assert curve["recall@1"][0] == pytest.approx(cell(report, q, "cloud-v1"))
        assert curve["recall@1"][-1] == pytest.approx(cell(report, q, "cloud-v2"))
        assert curve["map"][0] == pytest.approx(cell(report, q, "cloud-v1", "map"))
        assert curve["max_dip"]["recall@1"] == pytest.approx(max(0.0, curve["recall@1"][0] - min(curve["recall@1"])))
        assert len(curve["points"]) == 5


def test_mixed_gallery_is_seeded(bench: tuple[list[ModelEmbeddings], Labels]) -> None:
    spec = MixedSpec("cloud-v1", "cloud-v2", ("edge-v1",), shares=(0.0, 0.5), seed=7)
    first = build_report(*bench, Protocol(mixed=spec))["mixed"]
    assert build_report(*bench, Protocol(mixed=spec))["mixed"] == first


def test_manifest_metrics_form(report: dict[str, Any]) -> None:
    metrics = manifest_metrics(report)
    assert metrics["benchmark"] == "caltech101"
    assert set(metrics["matrix"]["cloud-v2"]["cloud-v1"]) == {"recall@1", "recall@5", "map"}
    assert metrics["matrix"]["cloud-v2"]["cloud-v1"]["recall@1"] == pytest.approx(cell(report, "cloud-v2", "cloud-v1"))


def test_bad_inputs_are_named(bench: tuple[list[ModelEmbeddings], Labels]) -> None:
    models, labels = bench
    with pytest.raises(ValueError, match="cloud-v9"):
        build_report(models, labels, Protocol(upgrades=(UpgradePair("cloud-v9", "cloud-v1", ("cloud-v1",)),)))
    with pytest.raises(ValueError, match="edge model must not have gallery"):
        ModelEmbeddings("e", "edge", 1, models[0].queries, models[0].gallery)
    with pytest.raises(ValueError, match="needs gallery"):
        ModelEmbeddings("c", "cloud", 1, models[0].queries)
    with pytest.raises(ValueError, match="role"):
        ModelEmbeddings("x", "phone", 1, models[0].queries)
    with pytest.raises(ValueError, match="query vectors"):
        build_report([ModelEmbeddings("e", "edge", 1, models[0].queries[:5])], labels, Protocol())
    with pytest.raises(ValueError, match="no gallery"):
        build_report(models, labels, Protocol(flips=(FlipPair("cloud-v1", "cloud-v2", "edge-v1"),)))
    with pytest.raises(ValueError, match="include 0"):
        MixedSpec("cloud-v1", "cloud-v2", ("cloud-v2",), shares=(0.5, 1.0))


def test_write_report_writes_every_file(report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(report, tmp_path / "out", name="tiny")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"tiny.json", "tiny.md", "tiny_matrix.png",
                                                              "tiny_mixed.png"}
    assert json.loads(paths["json"].read_text()) == report
    for png in (paths["matrix"], paths["mixed"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert markdown_table(report) in text
    assert "AC (main chain): 2/2" in text and "tiny_matrix.png" in text and "FAIL" in text


def test_markdown_table_has_a_row_per_pair(report: dict[str, Any]) -> None:
    lines = markdown_table(report).splitlines()
    assert len(lines) == 2 + len(report["matrix"])
    assert lines[0].startswith("| Case | Query | Gallery | R@1")
    assert any("cloud-v2-independent [independent]" in line for line in lines)


def test_evaluation_never_imports_torch() -> None:
    code = ("import sys, models.benchmark.metrics, models.benchmark.caltech, training.evaluate; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_open_world_report_leaves_each_photo_out_and_carries_both_benchmarks(
        report: dict[str, Any], bench: tuple[list[ModelEmbeddings], Labels], tmp_path: Path) -> None:
    models, labels = bench
    # an open-world style benchmark: the gallery photos query each other, every model encoding the same photos
    photos = labels.gallery >= 0
    open_models = [ModelEmbeddings(m.id, m.role, m.version, (m.gallery if m.gallery is not None else
                                                           models[0].gallery)[photos],
                                   None if m.gallery is None else m.gallery[photos], m.group)
                   for m in models if m.role == "cloud"]
    y = labels.gallery[photos]
    open_labels = Labels(y, y, np.zeros(len(y), dtype=bool), exclude_self=True)
    protocol = Protocol(upgrades=(UpgradePair("cloud-v2", "cloud-v1", ("cloud-v1",)),))
    world = build_report(open_models, open_labels, protocol, name="open")
    own = evaluate_retrieval(open_models[0].queries, open_models[0].gallery, y, y, open_labels.old_queries,
                             exclude_self=True)
    assert cell(world, "cloud-v1", "cloud-v1") == pytest.approx(own.overall.recall_at_1)
    assert cell(world, "cloud-v1", "cloud-v1") < 1.0  # without leave-one-out each photo would find itself
    assert world["data"]["leave_one_out"] is True
    world["reference"] = [{"model": "frozen lite0@96", "trunk": "lite0@96", "trained": False, "recall@1": 0.5,
                           "recall@5": 0.7, "map": 0.3, "queries": len(y)}]
    text = markdown_report(world)
    assert "each querying all the others" in text and "| frozen lite0@96 | lite0@96 | 0.500 |" in text
    metrics = manifest_metrics(report, world)
    assert metrics["benchmark"] == report["benchmark"] and metrics["benchmarks"][0]["benchmark"] == "open"
    assert metrics["benchmarks"][0]["matrix"]["cloud-v1"]["cloud-v1"]["recall@1"] == pytest.approx(
        own.overall.recall_at_1)
    with pytest.raises(ValueError, match="leave-one-out"):
        Labels(y[:3], y, np.zeros(3, dtype=bool), exclude_self=True)
