"""`concord bench`: the benchmark's vectors, recall and reports (structure and sanity, never speed)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.benchmark.report import interleave, latency_ms
from server.bench.data import EmbeddingSourceError, fitted_mixture, load_embeddings, mixture_for
from server.bench.search import recall_at_k
from tests.edge_helpers import run_cli


def clustered(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` centres with anisotropic noise: stand-ins for real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    scale = np.linspace(0.5, 0.02, dim)  # a decaying spectrum, as real embeddings have
    x = centres[rng.integers(0, clusters, count)] / np.sqrt(dim) + rng.standard_normal((count, dim)) * scale / 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def nearest_centre_cosine(x: np.ndarray, centres: np.ndarray) -> float:
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return float(np.mean(np.max(x @ unit.T, axis=1)))


def test_mixture_fitted_to_embeddings_reproduces_their_spread() -> None:
    real = clustered(3000, 32, 6, seed=1)
    mixture = fitted_mixture(real, components=6, seed=0, origin="test vectors")
    drawn = mixture.sample(3000, seed=5)
    assert drawn.shape == (3000, 32) and drawn.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, atol=1e-5)
    assert abs(nearest_centre_cosine(drawn, mixture.centres) - nearest_centre_cosine(real, mixture.centres)) < 0.05
    assert "fitted to 3000 real 32-d embeddings from test vectors" in mixture.source
    assert mixture.fidelity is not None and mixture.fidelity["compared_vectors"] == 3000
    assert abs(mixture.fidelity["real_median_nn_cosine"] - mixture.fidelity["synthetic_median_nn_cosine"]) < 0.1
    again = mixture.sample(3000, seed=5)
    np.testing.assert_array_equal(drawn, again)
    assert not np.array_equal(drawn, mixture.sample(3000, seed=6))


def test_embeddings_come_from_the_gallery_array_and_must_match_the_dim(tmp_path: Path) -> None:
    real = clustered(600, 16, 4, seed=2)
    path = tmp_path / "cloud-v2.npz"
    np.savez_compressed(path, gallery=real.astype(np.float16), queries=real[:10].astype(np.float16))
    loaded, origin = load_embeddings(path)
    assert loaded.shape == (600, 16) and origin == str(path)
    assert "fitted to 600" in mixture_for(16, 4, 0, path).source
    with pytest.raises(EmbeddingSourceError, match="16-d, the benchmark asks for 32-d"):
        mixture_for(32, 4, 0, path)
    fallback = mixture_for(16, 4, 0, tmp_path / "absent.npz")
    assert "no real embeddings" in fallback.source and "absent.npz does not exist" in fallback.source
    (tmp_path / "empty.npy").write_bytes(b"not numpy")
    with pytest.raises(EmbeddingSourceError, match="cannot read"):
        load_embeddings(tmp_path / "empty.npy")


def test_recall_counts_a_tied_neighbour_as_found() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    gallery[10] = gallery[3]  # an exact duplicate: either id is a right answer
    query = gallery[3:4] + 0.01
    scores = gallery @ query[0]
    exact = np.argsort(-scores)[:2]
    kth = np.sort(scores)[::-1][1:2]
    assert recall_at_k(exact[None], gallery, query, kth) == 1.0
    worst = np.argsort(scores)[:2]
    assert recall_at_k(worst[None], gallery, query, kth) == 0.0
    assert recall_at_k(np.array([[exact[0], -1]]), gallery, query, kth) == 0.5


def test_interleave_rotates_which_contender_goes_first() -> None:
    order: list[str] = []
    times = interleave({name: (lambda i, name=name: order.append(name)) for name in "abc"}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())
    stats = latency_ms([1_000_000, 2_000_000, 3_000_000])
    assert stats["p50"] == 2.0 and stats["min"] <= stats["p99"] <= stats["max"] == 3.0
    with pytest.raises(ValueError):
        latency_ms([])


def crops(photos: dict[str, bytes], count: int) -> list[bytes]:
    """`count` distinct real photos: crops of the bundled ones."""
    out = []
    for i in range(count):
        image = Image.open(io.BytesIO(list(photos.values())[i % len(photos)])).convert("RGB")
        w, h = image.size
        j = i // len(photos)
        buffer = io.BytesIO()
        image.crop((j * w // 30, j * h // 40, w - j * w // 50, h - j * h // 60)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def mixed_report() -> dict[str, Any]:
    """An evaluation report's mixed-gallery section, shaped as `training.evaluate` writes it."""
    return {"mixed": {"old_gallery": "cloud-v1", "new_gallery": "cloud-v2", "seed": 0,
                      "shares": [0.0, 0.25, 0.5, 0.75, 1.0],
                      "curves": [{"query": "edge-v2", "recall@1": [0.61, 0.63, 0.66, 0.68, 0.71],
                                  "map": [0.3, 0.31, 0.33, 0.35, 0.37], "max_dip": {"recall@1": 0.0},
                                  "points": [{}] * 5}]}}


@pytest.mark.slow
def test_bench_all_quick_writes_sane_reports(tiny_release: Path, sample_photos: dict[str, bytes], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(crops(sample_photos, 48)):
        (photos / f"photo_{i:02d}.jpg").write_bytes(data)
    evaluation = tmp_path / "caltech101.json"
    evaluation.write_text(json.dumps(mixed_report()))
    out = tmp_path / "bench"
    code, printed, err = run_cli(["bench", "all", "--quick", "--release", str(tiny_release), "--photos", str(photos),
                                  "--out", str(out), "--embeddings", str(tmp_path / "none.npz"),
                                  "--evaluation", str(evaluation)], capsys)
    assert code == 0, err
    assert "wrote" in printed
    assert f"no embeddings at {tmp_path / 'none.npz'}" in err and "seeded random mixture" in err  # said, not hidden
    search, encode, upgrade = (json.loads((out / f"{p}.json").read_text()) for p in ("search", "encode", "upgrade"))
    for report in (search, encode, upgrade):
        assert report["plan"]["name"] == "quick"
        assert {"cpu", "cores"} <= set(report["machine"]) and {"python", "numpy", "faiss", "onnxruntime"} <= set(
            report["versions"])
        assert report["command"]

    sizes = search["plan"]["sizes"]
    assert [row["gallery"] for row in search["sizes"]] == sizes
    for row in search["sizes"]:
        by_name = {v["name"]: v for v in row["variants"]}
        assert by_name["flat"]["recall@10"] == 1.0  # exact search finds the exact neighbours
        assert {v["family"] for v in row["variants"]} == {"flat", "hnsw", "ivf"}
        for v in row["variants"]:
            assert 0.0 <= v["recall@10"] <= 1.0
            assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p99"]
            assert v["qps_1_thread"] > 0 and v["qps_all_threads"] > 0
        assert row["memory"]["flat"]["serialized_bytes"] >= row["gallery"] * search["plan"]["dim"] * 4
        api = row["api"]
        assert api["top_k_agreement_api_vs_bare"] == 1.0  # the API answers what FAISS answers
        assert api["store"]["vectors"] == row["gallery"] and api["dim"] == 32
        assert api["http_upgrade"]["reencoded"] == 0
    assert "passed" in search["targets"]["approximate_recall_0_95_p99_under_10ms"]

    clouds = {r["model_id"]: r for r in encode["cloud"]}
    assert set(clouds) == {"cloud-v1", "cloud-v2"}
    assert all(r["photos_per_s_with_decoding"] > 0 and r["batch"] == 16 for r in clouds.values())
    assert {r["variant"] for r in encode["edge"]["models"]} >= {"device-fp32", "server"}
    assert encode["api_ingest"]["photos_added"] == 32 and encode["api_ingest"]["photos_in_store"] == 48

    assert (upgrade["old_model"], upgrade["new_model"]) == ("cloud-v1", "cloud-v2")
    rate = upgrade["backfill_rate"]["photos_per_s"]
    assert rate == clouds["cloud-v2"]["photos_per_s_with_decoding"]
    for row in upgrade["sizes"]:
        assert row["service"]["vectors_untouched"] and row["service"]["vectors"] == {"cloud-v1": row["gallery"]}
        assert row["http"]["changed"] and row["http"]["vectors_after"] == row["http"]["vectors_before"]
        assert row["backfill_s"] == pytest.approx(row["gallery"] / rate)
    assert upgrade["mixed_gallery"]["available"]
    assert upgrade["mixed_gallery"]["curves"][0]["recall@1"] == [0.61, 0.63, 0.66, 0.68, 0.71]

    summary = (out / "summary.md").read_text()
    assert "## Headline" in summary and "QUICK mode" in summary and "| edge-v2 | recall@1 | 0.610 |" in summary
    for png in ("search_recall_latency.png", "search_api_overhead.png", "upgrade_vs_backfill.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 200_000


def test_bench_refuses_an_unknown_part_and_a_missing_release(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["bench", "everything", "--quick", "--out", str(tmp_path)], capsys)
    assert code != 0 and "unknown benchmark 'everything'" in err
    code, _, err = run_cli(["bench", "search", "--quick", "--release", str(tmp_path / "nowhere"),
                            "--out", str(tmp_path)], capsys)
    assert code != 0 and "no release at" in err


def test_edge_latency_is_skipped_with_a_reason_when_the_release_has_no_device_file(
        tiny_release: Path, sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    from models.manifest import Manifest
    from models.release import Release
    from server.bench.encode import EncodeConfig, edge_latency

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_photos["chelsea"])
    config = EncodeConfig(edge_rounds=2, edge_warmup=0)
    measured = edge_latency(tiny_release, photo, config)
    assert {m["variant"] for m in measured["models"]} == {"device-fp32", "server"} and "skipped" not in measured
    slim = Release.load(tiny_release).ship(tmp_path / "slim", keep={})  # every model as its server file only
    skipped = edge_latency(slim.folder, photo, config)
    assert skipped["models"] == [] and "no device file to time" in skipped["skipped"]
    int8_only = Release.load(tiny_release).ship(tmp_path / "int8", keep={"edge-v2": "device-fp32"}).folder
    manifest = Manifest.load(int8_only)  # relabel the device file as int8: a release like the shipped one
    edge = manifest.model("edge-v2")
    relabelled = dataclasses.replace(edge, variants={"device-int8": dataclasses.replace(
        edge.variants["device-fp32"], precision="int8")})
    dataclasses.replace(manifest, models={**manifest.models, "edge-v2": relabelled}).save(int8_only / "manifest.json")
    measured = edge_latency(int8_only, photo, config)
    assert [m["name"] for m in measured["models"]] == ["edge int8", "cloud fp32"] and "device fp32" in measured["note"]
    assert all(m["latency_ms"]["runs"] == 2 and m["size_bytes"] > 0 for m in measured["models"])


def test_backends_compare_through_the_api(tiny_release: Path, tmp_path: Path) -> None:
    """`concord bench backends` on the embedded store and Milvus Lite (the standalone server has its own tests):
    every backend is filled through its add path, served, searched through the API; exact ones recall 1."""
    from server.bench.backends import backends_markdown, run_backends
    from server.bench.data import seeded_mixture

    mixture = seeded_mixture(32, 4, 0)
    report = run_backends(tiny_release, (300,), mixture, 6, 10, tmp_path, ("embedded-flat", "milvus-lite-flat"))
    rows = {row["backend"]: row for row in report["sizes"][0]["backends"]}
    assert set(rows) == {"embedded-flat", "milvus-lite-flat"}
    for row in rows.values():
        assert row["recall@10"] == 1.0 and row["ingest"]["vectors"] == 300 and row["api_rss_bytes"] > 0
        assert row["api_latency_ms"]["runs"] == 6
    assert rows["embedded-flat"]["p99_over_embedded_flat"] == 1.0
    assert report["sizes"][0]["migration"] == {**report["sizes"][0]["migration"], "photos": 300, "lost": 0}
    assert "| milvus-lite-flat | Milvus Lite FLAT" in backends_markdown({**report, "command": "test"})
