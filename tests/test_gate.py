"""The compatibility gate, judged from the figures of the tiny release's manifest (and edited copies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.gate import EDGE_GAP, EDGE_GAPS, check_gate, default_replaces
from models.manifest import Manifest


@pytest.fixture
def data(tiny_release: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((tiny_release / "manifest.json").read_text())
    return loaded


def entry(data: dict[str, Any], model_id: str) -> dict[str, Any]:
    return next(m for m in data["models"] if m["id"] == model_id)


def set_figure(data: dict[str, Any], query: str, gallery: str, metric: str, value: float | None) -> None:
    """Set M(query, gallery) in every model's matrix (None removes it)."""
    for model in data["models"]:
        cell = model["metrics"]["matrix"][query][gallery]
        if value is None:
            del cell[metric]
        else:
            cell[metric] = value


@pytest.mark.parametrize("model_id, replaces, checks", [
    ("cloud-v1", None, 0), ("edge-v1", None, 1), ("cloud-v2", "cloud-v1", 3), ("edge-v2", "edge-v1", 4)])
def test_the_tiny_lineage_passes(data: dict[str, Any], model_id: str, replaces: str | None, checks: int) -> None:
    manifest = Manifest.from_dict(data)
    assert default_replaces(manifest, model_id) == replaces
    verdict = check_gate(manifest, model_id, replaces)
    assert verdict.passed, verdict.reason
    assert len(verdict.checks) == checks and all(c.passed for c in verdict.checks)
    assert "passes the compatibility gate of space 'tiny'" in verdict.reason


def test_an_upgrade_must_beat_the_replaced_model_on_the_old_gallery(data: dict[str, Any]) -> None:
    set_figure(data, "cloud-v2", "cloud-v1", "recall@1", 0.78)  # equal to M(cloud-v1, cloud-v1): not better
    verdict = check_gate(Manifest.from_dict(data), "cloud-v2", "cloud-v1")
    assert not verdict.passed
    failed = [c for c in verdict.checks if not c.passed]
    assert [c.name for c in failed] == ["ECC recall@1: M(cloud-v2, cloud-v1) > M(cloud-v1, cloud-v1)"]
    assert failed[0].measured == pytest.approx(0.78) and failed[0].threshold == pytest.approx(0.78)
    assert "cannot be registered into space 'tiny'" in verdict.reason
    assert "could only start a new space, which needs a backfill" in verdict.reason


def test_an_edge_upgrade_is_judged_on_map_too(data: dict[str, Any]) -> None:
    set_figure(data, "edge-v2", "cloud-v1", "map", 0.50)  # below M(edge-v1, cloud-v1) map = 0.58
    verdict = check_gate(Manifest.from_dict(data), "edge-v2", "edge-v1")
    assert not verdict.passed
    assert "ECC map: M(edge-v2, cloud-v1) > M(edge-v1, cloud-v1): measured 0.5000, needs 0.5800" in verdict.reason


def test_a_missing_figure_fails_and_is_named(data: dict[str, Any]) -> None:
    set_figure(data, "cloud-v1", "cloud-v1", "map", None)
    verdict = check_gate(Manifest.from_dict(data), "cloud-v2", "cloud-v1")
    assert not verdict.passed
    assert "missing figure: M(cloud-v1, cloud-v1) map" in verdict.reason


def test_no_figures_at_all_fail_the_edge_gate(data: dict[str, Any]) -> None:
    for model in data["models"]:
        model["metrics"] = {}
    verdict = check_gate(Manifest.from_dict(data), "edge-v1", None)
    assert not verdict.passed
    assert "missing figure: M(edge-v1, cloud-v1) recall@1, M(cloud-v1, cloud-v1) recall@1" in verdict.reason


def test_figures_of_another_benchmark_do_not_count(data: dict[str, Any]) -> None:
    assert check_gate(Manifest.from_dict(data), "edge-v1", None).passed
    del entry(data, "edge-v1")["metrics"]["matrix"]["cloud-v1"]  # M(cloud-v1, cloud-v1) now read from cloud-v1's
    assert check_gate(Manifest.from_dict(data), "edge-v1", None).passed
    entry(data, "edge-v1")["metrics"]["benchmark"] = "other"  # ... but not from another benchmark
    verdict = check_gate(Manifest.from_dict(data), "edge-v1", None)
    assert not verdict.passed and "missing figure: M(cloud-v1, cloud-v1) recall@1" in verdict.reason


def add_open_world(data: dict[str, Any], scale: float = 0.8) -> None:
    """Give every model an open-world section: its Caltech figures scaled by `scale`."""
    for model in data["models"]:
        matrix = {q: {g: {k: v * scale for k, v in cell.items()} for g, cell in row.items()}
                  for q, row in model["metrics"]["matrix"].items()}
        model["metrics"]["benchmarks"] = [{"benchmark": "tinyimagenet_open", "matrix": matrix}]


def set_open_figure(data: dict[str, Any], query: str, gallery: str, metric: str, value: float) -> None:
    for model in data["models"]:
        model["metrics"]["benchmarks"][0]["matrix"][query][gallery][metric] = value


def test_the_gate_judges_every_benchmark(data: dict[str, Any]) -> None:
    add_open_world(data)
    verdict = check_gate(Manifest.from_dict(data), "cloud-v2", "cloud-v1")
    assert verdict.passed, verdict.reason
    assert len(verdict.checks) == 5  # lineage, then ECC on Recall@1 and mAP on each benchmark
    assert sum(c.name.endswith("on tinyimagenet_open") for c in verdict.checks) == 2
    open_old = data["models"][0]["metrics"]["benchmarks"][0]["matrix"]["cloud-v1"]["cloud-v1"]["recall@1"]
    set_open_figure(data, "cloud-v2", "cloud-v1", "recall@1", open_old - 0.01)  # fails only open-world
    verdict = check_gate(Manifest.from_dict(data), "cloud-v2", "cloud-v1")
    assert not verdict.passed
    assert [c.name for c in verdict.checks if not c.passed] == [
        "ECC recall@1: M(cloud-v2, cloud-v1) > M(cloud-v1, cloud-v1) on tinyimagenet_open"]


def test_the_open_world_edge_gap_is_its_own_limit(data: dict[str, Any]) -> None:
    add_open_world(data, scale=1.0)
    own = data["models"][0]["metrics"]["matrix"]["cloud-v1"]["cloud-v1"]["recall@1"]
    assert EDGE_GAPS["tinyimagenet_open"] == pytest.approx(0.10)
    set_open_figure(data, "edge-v1", "cloud-v1", "recall@1", own - 0.09)  # 0.09 < 0.10: passes there
    verdict = check_gate(Manifest.from_dict(data), "edge-v1", None)
    assert verdict.passed, verdict.reason
    set_open_figure(data, "edge-v1", "cloud-v1", "recall@1", own - 0.11)
    verdict = check_gate(Manifest.from_dict(data), "edge-v1", None)
    assert not verdict.passed and "- 0.1 on tinyimagenet_open" in verdict.reason


@pytest.mark.parametrize("cross, passed", [(0.78 - EDGE_GAP, True), (0.78 - EDGE_GAP - 0.001, False)])
def test_the_edge_gap_rule(data: dict[str, Any], cross: float, passed: bool) -> None:
    set_figure(data, "edge-v1", "cloud-v1", "recall@1", cross)  # M(cloud-v1, cloud-v1) = 0.78
    verdict = check_gate(Manifest.from_dict(data), "edge-v1", None)
    assert verdict.passed is passed, verdict.reason
    (check,) = verdict.checks
    assert check.name == "edge gap recall@1: M(edge-v1, cloud-v1) >= M(cloud-v1, cloud-v1) - 0.03"
    assert check.threshold == pytest.approx(0.75)


def test_an_edge_model_is_judged_against_the_cloud_of_its_version(data: dict[str, Any]) -> None:
    set_figure(data, "edge-v2", "cloud-v2", "recall@1", 0.80)  # M(cloud-v2, cloud-v2) = 0.90
    verdict = check_gate(Manifest.from_dict(data), "edge-v2", "edge-v1")
    assert not verdict.passed and "M(edge-v2, cloud-v2) >= M(cloud-v2, cloud-v2) - 0.03" in verdict.reason


def test_a_model_outside_the_lineage_cannot_enter_the_space(data: dict[str, Any]) -> None:
    independent = {**entry(data, "cloud-v2"), "id": "cloud-v2-independent", "parents": []}
    data["models"].append(independent)
    for model in data["models"]:  # give it figures that would pass if lineage were ignored
        model["metrics"]["matrix"]["cloud-v2-independent"] = model["metrics"]["matrix"]["cloud-v2"]
    verdict = check_gate(Manifest.from_dict(data), "cloud-v2-independent", "cloud-v1")
    assert not verdict.passed
    assert "lineage: descends from a model of space 'tiny'" in verdict.reason


def test_a_replacement_of_the_wrong_kind_fails(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    assert "'cloud-v1' is a cloud model" in check_gate(manifest, "edge-v2", "cloud-v1").reason
    assert "not lower than" in check_gate(manifest, "cloud-v1", "cloud-v2").reason
    assert "'cloud-v0' is not in the release" in check_gate(manifest, "cloud-v2", "cloud-v0").reason
    unknown = check_gate(manifest, "cloud-v9", None)
    assert not unknown.passed and "unknown model 'cloud-v9'" in unknown.reason
    assert check_gate(manifest, "cloud-v2", "cloud-v1").to_dict()["passed"] is True
