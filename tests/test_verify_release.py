"""`concord verify-release`: figures measured through a real server equal the ones computed directly, and are
judged against the manifest's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from models.benchmark.caltech import load_split
from models.manifest import Manifest
from models.preprocess import load_image
from models.release import Release
from server.bench.verify_release import VerifyConfig, run_verify
from tests.caltech_helpers import make_caltech


def direct_recall(release: Release, data: Path, query: str, variant: str, gallery: str) -> float:
    """Recall@1 computed here without the server: encode both sides, take the nearest gallery photo's label."""
    split = load_split(data)
    g = release.encoder(gallery).encode_images([load_image(split.image_dir / p) for p in split.gallery])
    q = release.encoder(query, variant).encode_images([load_image(split.image_dir / p) for p in split.queries])
    top = np.argmax(q @ g.T, axis=1)
    return float(np.mean(split.gallery_labels[top] == split.query_labels))


def with_figures(tiny_release: Path, folder: Path, figures: dict[tuple[str, str], float]) -> Path:
    """A copy of the tiny release whose manifest records the given Recall@1 figures (in every model's matrix)."""
    shutil.copytree(tiny_release, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for model in data["models"]:
        for (query, gallery), value in figures.items():
            model["metrics"]["matrix"][query][gallery]["recall@1"] = value
    (folder / "manifest.json").write_text(json.dumps(data))
    Manifest.load(folder)
    return folder


def test_verify_release_measures_through_the_server_and_judges_against_the_manifest(
        tiny_release: Path, tmp_path: Path) -> None:
    data = make_caltech(tmp_path / "caltech")
    release = Release.load(tiny_release)
    edge = direct_recall(release, data, "edge-v2", "device-fp32", "cloud-v1")
    cloud = direct_recall(release, data, "cloud-v2", "server", "cloud-v2")
    # the edge figure is recorded as measured; the cloud figure 0.1 higher than it is: that pair must fail
    patched = with_figures(tiny_release, tmp_path / "release",
                           {("edge-v2", "cloud-v1"): edge, ("cloud-v2", "cloud-v2"): cloud + 0.1})
    config = VerifyConfig(release=patched, data=data, work=tmp_path / "work", out=tmp_path / "out", batch=5,
                          threads=1, progress=False)
    result = run_verify(config)

    rows = {(r["query_model"], r["query_file"]): r for r in result["results"]}
    device = rows[("edge-v2", "device-fp32")]
    assert device["measured"]["all"]["recall@1"] == edge
    assert device["passed"] and device["required"]
    photo = rows[("cloud-v2", "server")]
    assert photo["measured"]["all"]["recall@1"] == cloud
    assert abs(photo["difference_recall@1"] + 0.1) < 1e-9 and not photo["passed"]
    assert not rows[("edge-v2", "client-fp32")]["required"]
    assert result["passed"] is False
    split = load_split(data)
    for store in result["stores"].values():
        assert store["sent"] == len(split.gallery) and sum(store["vectors"].values()) == len(split.gallery)
    assert set(result["stores"]["cloud-v2"]["vectors"]) == {"cloud-v2"}
    written = json.loads((tmp_path / "out" / "verify.json").read_text())
    assert written["results"] == result["results"]
    assert "FAIL" in (tmp_path / "out" / "verify.md").read_text()

    again = run_verify(config)  # resumes: the stores hold every photo, nothing is sent again
    assert [s["sent"] for s in again["stores"].values()] == [0, 0]
    assert [r["measured"] for r in again["results"]] == [r["measured"] for r in result["results"]]
