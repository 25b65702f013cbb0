"""Export to a release: files pass the checker and reproduce torch; a differing module, a failing gate or a bad
checkpoint stops the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from models.cli import main
from models.preprocess import load_image, preprocess_batch
from models.release import Release
from tests.export_helpers import DIM, report, small_encoder, train_config, write_checkpoint
from training import export as export_module
from training.arch import build_encoder
from training.convert import to_onnx
from training.export import (
    ExportError,
    export_model,
    export_release,
    load_encoder,
    model_entry,
    report_metrics,
    verify_export,
)

FIGURES = {"cloud-v1": 0.80, "edge-v1": 0.79}


@pytest.fixture(scope="module")
def photos(sample_photos: dict[str, bytes]) -> list[bytes]:
    return list(sample_photos.values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, photos: list[bytes]) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    return [write_checkpoint(folder / "cloud-v1.pt", small_encoder(64, 1, photos),
                             train_config("cloud-v1", "cloud", 1, 64, [])),
            write_checkpoint(folder / "edge-v1.pt", small_encoder(32, 2, photos),
                             train_config("edge-v1", "edge", 1, 32, ["cloud-v1"]))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoints: list[Path], photos: list[bytes]) -> Path:
    out = tmp_path_factory.mktemp("export") / "release"
    export_release(checkpoints, out, photos[:4], report(FIGURES), release="test-release")
    return out


def test_the_release_holds_checked_server_and_device_files(exported: Path) -> None:
    release = Release.load(exported)
    assert release.manifest.release == "test-release" and sorted(release.manifest.models) == ["cloud-v1", "edge-v1"]
    for model_id, resolution in (("cloud-v1", 64), ("edge-v1", 32)):
        entry = release.manifest.model(model_id)
        assert (entry.input, entry.output, entry.dim, entry.arch) == ("image", "embedding", DIM, "lite0")
        assert (entry.preprocess.resize, entry.preprocess.crop) == (resolution, resolution)
        for variant, batch in (("server", "batch"), ("device-fp32", 1)):
            graph = onnx.load(str(release.path(model_id, variant)))
            onnx.checker.check_model(graph, full_check=True)
            dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
            assert [i.name for i in graph.graph.input] == ["image"] and dims == [batch, 3, resolution, resolution]
            assert [o.name for o in graph.graph.output] == ["embedding"]
        assert entry.variants["device-fp32"].batch == 1
        assert min(entry.card["export"]["worst_cosine"].values()) >= 0.9999
        assert entry.card["views"][0] == "plain" and entry.card["distil_views"] == []  # how it saw its photos
    edge = release.manifest.model("edge-v1")
    assert edge.parents == ("cloud-v1",) and edge.space == "test" and release.manifest.spaces["test"].dim == DIM
    assert edge.metrics["matrix"]["edge-v1"]["cloud-v1"]["recall@1"] == pytest.approx(0.78)
    assert edge.card["gate"]["passed"] and edge.card["gate"]["checks"][0]["name"].startswith("edge gap")


@pytest.mark.parametrize("model_id, variant", [("cloud-v1", "server"), ("edge-v1", "device-fp32")])
def test_the_runtime_reproduces_the_checkpoint_on_real_photos(exported: Path, checkpoints: list[Path],
                                                              photos: list[bytes], model_id: str,
                                                              variant: str) -> None:
    encoder, config = load_encoder(next(c for c in checkpoints if c.stem == model_id))
    release = Release.load(exported)
    got = release.encoder(model_id, variant).encode_bytes(photos)
    inputs = preprocess_batch([load_image(p) for p in photos], release.manifest.model(model_id).preprocess)
    with torch.no_grad():
        want = encoder(torch.from_numpy(inputs)).numpy()
    assert config.model_id == model_id
    assert (got * want).sum(axis=1).min() >= 0.9999
    assert (got @ got.T).min() < 0.95  # the photos embed apart: the comparison is not trivially 1


def test_a_module_that_differs_from_the_export_is_refused(exported: Path, checkpoints: list[Path],
                                                          photos: list[bytes]) -> None:
    release = Release.load(exported)
    entry = release.manifest.model("cloud-v1")
    inputs = preprocess_batch([load_image(p) for p in photos], entry.preprocess)
    encoder, _ = load_encoder(checkpoints[0])
    assert verify_export(encoder, release.path("cloud-v1"), entry, inputs) >= 0.9999
    with torch.no_grad():
        encoder.head.linear.weight.add_(0.5 * torch.randn_like(encoder.head.linear.weight))
    refused = r"cloud-v1.onnx: onnxruntime does not reproduce torch: worst cosine -?\d\.\d+ \(photo #\d\)"
    with pytest.raises(ExportError, match=refused):
        verify_export(encoder, release.path("cloud-v1"), entry, inputs)


def test_an_export_whose_graph_differs_stops_and_leaves_no_release(checkpoints: list[Path], photos: list[bytes],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_module.to_onnx

    def perturbed(module: torch.nn.Module, path: Path, resolution: int, batch: int | None = None) -> Path:
        other = small_encoder(resolution, 99, photos[:3])
        return real(other, path, resolution, batch)

    monkeypatch.setattr(export_module, "to_onnx", perturbed)
    with pytest.raises(ExportError, match="worst cosine"):
        export_release(checkpoints[:1], tmp_path / "release", photos[:3])
    assert not (tmp_path / "release").exists() and list(tmp_path.iterdir()) == []


def test_export_puts_the_module_in_eval_mode_and_leaves_its_statistics(tmp_path: Path, photos: list[bytes]) -> None:
    encoder = small_encoder(32, 3, photos).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    config = train_config("edge-v9", "edge", 1, 32, [])
    done = export_model(encoder, model_entry(config), tmp_path, [load_image(p) for p in photos[:3]])
    assert min(done.cosines.values()) >= 0.9999 and not encoder.training
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


BAD_GAP = {"cloud-v1": 0.80, "edge-v1": 0.60}  # a cross-device gap of 0.2


def test_a_model_failing_the_gate_stops_the_export_before_any_file(checkpoints: list[Path], photos: list[bytes],
                                                                   tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"'edge-v1' fails the compatibility gate .* needs a backfill"):
        export_release(checkpoints, tmp_path / "release", photos[:2], report(BAD_GAP))
    with pytest.raises(ExportError, match=r"missing figure: M\(edge-v1, cloud-v1\) recall@1"):
        export_release(checkpoints, tmp_path / "release", photos[:2], None)
    assert list(tmp_path.iterdir()) == []


def test_a_release_missing_a_parent_is_refused(checkpoints: list[Path], photos: list[bytes], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"invalid: model 'edge-v1': parent 'cloud-v1' is not in the release"):
        export_release(checkpoints[1:], tmp_path / "release", photos[:2])


def broken(folder: Path, photos: list[bytes], change: dict[str, Any], done: bool = True) -> Path:
    config = {k: v for k, v in train_config("cloud-v1", "cloud", 1, 32, []).to_dict().items()
              if change.get(k, 0) is not None}
    config.update({k: v for k, v in change.items() if v is not None})
    return write_checkpoint(folder / "broken.pt", small_encoder(32, 4, photos[:2]), config, done)


@pytest.mark.parametrize("change, done, message", [
    ({"space": None, "parents": None}, True, r"its config lacks \['parents', 'space'\]"),
    ({}, False, r"training of 'cloud-v1' is unfinished \(epoch 1\)"),
    ({"semantic_dim": 24}, True, r"the weights do not fit lite0 semantic_dim 24"),
    ({"semantic_dim": None, "dim": 24}, True, r"the weights do not fit lite0 semantic_dim 24"),  # the old key
])
def test_a_bad_checkpoint_is_named(tmp_path: Path, photos: list[bytes], change: dict[str, Any], done: bool,
                                   message: str) -> None:
    with pytest.raises(ExportError, match=message):
        load_encoder(broken(tmp_path, photos, change, done))


def test_a_checkpoint_written_before_the_rename_still_loads(tmp_path: Path, photos: list[bytes]) -> None:
    config = train_config("cloud-v1", "cloud", 1, 32, []).to_dict()
    config["dim"] = config.pop("semantic_dim")  # the key's name until semantic and stored widths were told apart
    _, loaded = load_encoder(write_checkpoint(tmp_path / "old.pt", small_encoder(32, 4, photos[:2]), config))
    assert loaded.semantic_dim == DIM and model_entry(loaded).dim == DIM


def test_an_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such checkpoint"):
        load_encoder(tmp_path / "gone.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ExportError, match=r"junk\.pt: not a readable torch checkpoint"):
        load_encoder(tmp_path / "junk.pt")


def test_the_export_command(checkpoints: list[Path], sample_photos: dict[str, bytes], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    for name, data in list(sample_photos.items())[:3]:
        (photo_dir / f"{name}.jpg").write_bytes(data)
    (tmp_path / "report.json").write_text(json.dumps(report(BAD_GAP)))
    args = ["export", *map(str, checkpoints), "--out", str(tmp_path / "release"), "--photos", str(photo_dir),
            "--report", str(tmp_path / "report.json"), "--name", "cli", "--no-gate"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), out + err
    assert "cloud-v1: cloud-v1.onnx (+device-fp32); worst cosine server " in out
    assert "gate passed" in out and "edge-v1" in out and "gate FAILED: 'edge-v1' fails" in out
    manifest = Release.load(tmp_path / "release").manifest
    assert manifest.release == "cli" and manifest.model("edge-v1").card["gate"]["passed"] is False
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and "already exists" in capsys.readouterr().err


def test_report_figures_are_taken_from_either_report_form() -> None:
    figures = {"cloud-v1": 0.80, "edge-v1": 0.79, "cloud-v2-independent": 0.9}
    as_dict = report(figures)
    rows = [{"query": q, "gallery": g, "overall": {**cell, "queries": 10}, "old": {"recall@1": 0.1}}
            for q, row in as_dict["matrix"].items() for g, cell in row.items()]
    ids = ["cloud-v1", "edge-v1"]
    kept = report_metrics(as_dict, ids)
    assert kept["benchmark"] == "test" and sorted(kept["matrix"]) == ids and sorted(kept["matrix"]["edge-v1"]) == ids
    assert report_metrics({"benchmark": "test", "matrix": rows}, ids) == kept
    assert report_metrics(None, ids) == {}
    with pytest.raises(ExportError, match="no 'matrix'"):
        report_metrics({"benchmark": "test"}, ids)
    with pytest.raises(ExportError, match="rows lack 'overall'"):
        report_metrics({"benchmark": "test", "matrix": [{"query": "cloud-v1", "gallery": "cloud-v1"}]}, ids)


def test_same_padding_is_folded_into_the_convolutions(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    encoder = build_encoder("lite0", 96, semantic_dim=DIM, hidden=0, pretrained=False).eval()
    path = to_onnx(encoder, tmp_path / "folded.onnx", 96)
    graph = onnx.load(str(path)).graph
    assert not [node.name for node in graph.node if node.op_type == "Pad"]  # every SAME pad now lives in its Conv
    assert any(list(a.ints) == [0, 0, 1, 1] for node in graph.node if node.op_type == "Conv" for a in node.attribute
               if a.name == "pads")  # the asymmetric TF padding of a stride-2 3x3 conv, kept exactly
    images = torch.rand(2, 3, 96, 96)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, encoder(images).numpy(), atol=1e-5)
