"""The release store: a real release loads; missing, tampered or misplaced files and bad manifests are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.lineage import comparable, explain_incompatible, lineage, searchable_galleries
from models.manifest import Manifest, ManifestError
from models.release import Release, ReleaseError, sha256_file
from models.runtime import OnnxEncoder


def copy(tiny_release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_release, tmp_path / "release"))


def manifest_data(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data


def flip_byte(path: Path, at: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_tiny_release_loads_and_verifies(tiny_release: Path) -> None:
    release = Release.load(tiny_release)
    assert sorted(release.manifest.models) == ["cloud-v1", "cloud-v2", "edge-v1", "edge-v2"]
    assert release.folder == tiny_release
    for entry in release.manifest.models.values():
        for variant, model_file in entry.files().items():
            assert sha256_file(release.path(entry.id, variant)) == model_file.sha256
    assert release.path("edge-v1", "device-fp32").name == "edge-v1.device.onnx"


def test_encoders_are_cached_per_file_and_threads(tiny_release: Path) -> None:
    release = Release.load(tiny_release)
    encoder = release.encoder("edge-v2", "device-fp32")
    assert isinstance(encoder, OnnxEncoder) and encoder.model_id == "edge-v2" and encoder.fixed_batch == 1
    assert release.encoder("edge-v2", "device-fp32") is encoder
    assert release.encoder("edge-v2") is not encoder and release.encoder("edge-v2").fixed_batch is None
    assert release.encoder("edge-v2", "device-fp32", threads=1) is not encoder


@pytest.mark.parametrize("variant, name", [("server", "edge-v2.onnx"), ("device-fp32", "edge-v2.device.onnx")])
def test_a_tampered_file_is_refused_by_model_and_name(tiny_release: Path, tmp_path: Path, variant: str,
                                                      name: str) -> None:
    folder = copy(tiny_release, tmp_path)
    flip_byte(folder / name)
    with pytest.raises(ReleaseError, match=rf"'edge-v2' {variant} file '{name}': sha256 .* differs"):
        Release.load(folder)


def test_a_missing_file_is_refused_by_model_and_name(tiny_release: Path, tmp_path: Path) -> None:
    folder = copy(tiny_release, tmp_path)
    (folder / "cloud-v2.onnx").unlink()
    with pytest.raises(ReleaseError, match=r"'cloud-v2' server file 'cloud-v2.onnx': missing"):
        Release.load(folder)


def test_a_file_swapped_after_an_unverified_load_is_refused_when_loaded(tiny_release: Path, tmp_path: Path) -> None:
    folder = copy(tiny_release, tmp_path)
    release = Release.load(folder, verify=False)
    shutil.copy(folder / "cloud-v1.onnx", folder / "cloud-v2.onnx")  # a valid graph, but not the released one
    assert release.encoder("cloud-v1").model_id == "cloud-v1"
    with pytest.raises(ReleaseError, match=r"'cloud-v2' file cloud-v2.onnx: sha256 .* refusing"):
        release.encoder("cloud-v2")


def test_a_file_outside_the_release_folder_is_refused(tiny_release: Path, tmp_path: Path) -> None:
    folder = copy(tiny_release, tmp_path)
    data = manifest_data(folder)
    data["models"][0]["file"] = "../elsewhere.onnx"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ReleaseError, match=r"'cloud-v1' server file '../elsewhere.onnx': must be a path inside"):
        Release.load(folder, verify=False)


def test_unknown_models_and_variants_are_named(tiny_release: Path, tmp_path: Path) -> None:
    release = Release.load(tiny_release)
    with pytest.raises(KeyError, match="unknown model 'cloud-v9'"):
        release.encoder("cloud-v9")
    with pytest.raises(ReleaseError, match=r"'cloud-v1' has no 'device-fp32' file; it has \['server'\]"):
        release.path("cloud-v1", "device-fp32")
    with pytest.raises(ReleaseError, match="no release folder"):
        Release.load(tmp_path / "nowhere")


def mutate(data: dict[str, Any], model: int, change: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    for key, value in change.items():
        if value is None:
            del data["models"][model][key]
        else:
            data["models"][model][key] = value
    return data


@pytest.mark.parametrize("model, change, message", [
    (0, {"dim": "32"}, r"model 'cloud-v1'.dim: expected int, got str '32'"),
    (0, {"role": "phone"}, r"model 'cloud-v1'.role: must be one of \('cloud', 'edge'\), got 'phone'"),
    (1, {"sha256": None}, r"model 'edge-v1': missing the field 'sha256'"),
    (1, {"sha256": "abc"}, r"model 'edge-v1'.sha256: expected 64 lowercase hex digits"),
    (2, {"dim": 64}, r"model 'cloud-v2'.dim: 64 differs from the dim 32 of space 'tiny'"),
    (3, {"parents": ["cloud-v2", "edge-v0"]}, r"model 'edge-v2': parent 'edge-v0' is not in the release"),
    (3, {"space": "other"}, r"model 'edge-v2'.space: unknown space 'other'"),
    (2, {"preprocess": {"crop": 64}}, r"model 'cloud-v2'.preprocess is missing the key 'resize'"),
    (2, {"version": 0}, r"model 'cloud-v2'.version: must be a positive integer"),
])
def test_a_manifest_with_a_wrong_field_names_it(tiny_release: Path, model: int, change: dict[str, Any],
                                                message: str) -> None:
    data = manifest_data(tiny_release)
    assert Manifest.from_dict(data).to_dict() == data  # the untouched manifest round-trips
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(mutate(data, model, change))


def test_a_bad_manifest_file_is_a_manifest_error_on_load(tiny_release: Path, tmp_path: Path) -> None:
    folder = copy(tiny_release, tmp_path)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Release.load(folder)


def test_lineage_and_who_may_search_whom(tiny_release: Path) -> None:
    manifest = Release.load(tiny_release, verify=False).manifest
    assert lineage(manifest, "cloud-v1") == set()
    assert lineage(manifest, "edge-v2") == {"cloud-v2", "edge-v1", "cloud-v1"}
    assert comparable(manifest, "edge-v1", "cloud-v1")  # an edge and the cloud it was trained toward
    assert comparable(manifest, "cloud-v1", "edge-v2")  # ancestor and descendant, both ways
    assert comparable(manifest, "edge-v1", "cloud-v2")  # a late device searches the upgraded gallery
    assert searchable_galleries(manifest, "edge-v1") == ["cloud-v1", "cloud-v2", "edge-v1", "edge-v2"]
    assert explain_incompatible(manifest, "edge-v1", "cloud-v2") == ""


def with_models(manifest: Manifest, extra: list[dict[str, Any]], spaces: list[dict[str, Any]]) -> Manifest:
    data = manifest.to_dict()
    template = data["models"][0]
    data["models"] += [{**template, **change} for change in extra]
    data["spaces"] += spaces
    return Manifest.from_dict(data)


def test_models_not_joined_by_lineage_or_in_another_space_are_not_comparable(tiny_release: Path) -> None:
    base = Release.load(tiny_release, verify=False).manifest
    manifest = with_models(base, [
        {"id": "cloud-v2-independent", "version": 2, "parents": []},
        {"id": "merged", "version": 3, "parents": ["cloud-v2-independent", "cloud-v2"]},
        {"id": "wide", "space": "wide", "dim": 64, "parents": []},
    ], [{"id": "wide", "dim": 64, "metric": "inner_product"}])
    assert not comparable(manifest, "cloud-v2-independent", "cloud-v1")
    # a model with parents in two unrelated lineages does not make those lineages comparable
    assert comparable(manifest, "merged", "cloud-v1") and comparable(manifest, "merged", "cloud-v2-independent")
    assert not comparable(manifest, "cloud-v2", "cloud-v2-independent")
    why = explain_incompatible(manifest, "cloud-v2-independent", "cloud-v1")
    assert "not joined by lineage" in why and "backfill" in why and "['cloud-v2-independent']" in why
    why = explain_incompatible(manifest, "wide", "cloud-v1")
    assert "space 'wide'" in why and "space 'tiny'" in why and not comparable(manifest, "wide", "cloud-v1")
    assert "unknown query model 'nope'" in explain_incompatible(manifest, "nope", "cloud-v1")
    assert not comparable(manifest, "cloud-v1", "nope")


def test_shipped_release_keeps_one_verified_file_per_model(tiny_release: Path, tmp_path: Path) -> None:
    shipped = Release.load(tiny_release).ship(tmp_path / "shipped", {"edge-v1": "device-fp32"})
    edge = shipped.manifest.model("edge-v1")
    assert edge.file == "edge-v1.device.onnx" and set(edge.variants) == {"device-fp32"}
    assert shipped.manifest.model("cloud-v1").variants == {}
    assert sorted(p.name for p in (tmp_path / "shipped").iterdir()) == sorted(
        ["manifest.json", "cloud-v1.onnx", "cloud-v2.onnx", "edge-v1.device.onnx", "edge-v2.onnx"])
    vectors = shipped.encoder("edge-v1", "device-fp32").encode_arrays(np.random.rand(3, 3, 32, 32).astype(np.float32))
    assert vectors.shape == (3, 32)


def test_shipping_over_a_shipped_release_keeps_its_files_and_takes_the_new_figures(tiny_release: Path,
                                                                                  tmp_path: Path) -> None:
    shipped = Release.load(tiny_release).ship(tmp_path / "shipped", {"edge-v1": "device-fp32"})
    newer = tmp_path / "newer"
    shutil.copytree(tiny_release, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    for entry in manifest["models"]:
        entry["metrics"] = {"benchmark": "newer", "matrix": {}}
    (newer / "manifest.json").write_text(json.dumps(manifest))
    carried = Release.load(newer).ship(tmp_path / "out", {}, carry=shipped)
    edge = carried.manifest.model("edge-v1")
    assert edge.file == "edge-v1.device.onnx" and set(edge.variants) == {"device-fp32"}  # the shipped file...
    assert (tmp_path / "out" / edge.file).read_bytes() == (tmp_path / "shipped" / edge.file).read_bytes()
    assert edge.metrics["benchmark"] == "newer"  # ...with the new release's figures
    next(e for e in manifest["models"] if e["id"] == "cloud-v1")["preprocess"]["interpolation"] = "bilinear"
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match=r"cloud-v1: .* differ in \['preprocess'\]"):
        Release.load(newer).ship(tmp_path / "out2", {}, carry=shipped)


def test_a_renewed_edge_model_ships_its_new_file_and_a_cloud_model_cannot_be_renewed(tiny_release: Path,
                                                                                   tmp_path: Path) -> None:
    shipped = Release.load(tiny_release).ship(tmp_path / "shipped", {})
    newer = tmp_path / "newer"
    shutil.copytree(tiny_release, newer)
    (newer / "edge-v2.device.onnx").write_bytes((newer / "edge-v1.device.onnx").read_bytes())  # a new device file
    manifest = json.loads((newer / "manifest.json").read_text())
    entry = next(e for e in manifest["models"] if e["id"] == "edge-v2")
    entry["variants"]["device-fp32"]["sha256"] = sha256_file(newer / "edge-v2.device.onnx")
    (newer / "manifest.json").write_text(json.dumps(manifest))
    renewed = Release.load(newer).ship(tmp_path / "out", {"edge-v2": "device-fp32"}, carry=shipped, renew=["edge-v2"])
    edge = renewed.manifest.model("edge-v2")
    assert (tmp_path / "out" / edge.file).read_bytes() == (newer / "edge-v1.device.onnx").read_bytes()
    cloud = renewed.manifest.model("cloud-v2")  # not renewed: carried exactly
    assert (tmp_path / "out" / cloud.file).read_bytes() == (tmp_path / "shipped" / cloud.file).read_bytes()
    with pytest.raises(ReleaseError, match="cloud-v2: only an edge model can be renewed"):
        Release.load(newer).ship(tmp_path / "out2", {}, carry=shipped, renew=["cloud-v2"])


def test_the_ship_command_writes_a_slim_release_and_never_overwrites(tiny_release: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from models.cli import main

    out = tmp_path / "ship"
    with pytest.raises(SystemExit) as exit_info:
        main(["ship", "--release", str(tiny_release), "--out", str(out), "--keep", "edge-v2=device-fp32"])
    assert exit_info.value.code in (0, None)
    shipped = Release.load(out)
    assert shipped.manifest.model("edge-v2").file == "edge-v2.device.onnx"
    assert shipped.manifest.model("edge-v1").file == "edge-v1.onnx"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["ship", "--release", str(tiny_release), "--out", str(out)])
    assert exit_info.value.code == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
