"""Static int8 quantisation of a tiny edge model, calibrated on real photos, registered in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.photos import PhotoSourceError, list_photos
from edge.quantize import INT8_VARIANT, QuantizeConfig, QuantizeError, quantize_model
from models.manifest import Manifest
from models.preprocess import load_image
from models.release import Release, sha256_file
from tests.edge_helpers import copy_release, run_cli, write_photos


@pytest.fixture(scope="module")
def quantised(tiny_release: Path, sample_photos: dict[str, bytes],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A copy of the tiny release whose edge-v2 was quantised with the sample photos (by the command)."""
    tmp = tmp_path_factory.mktemp("quantised")
    release = copy_release(tiny_release, tmp)
    photos = write_photos(sample_photos, tmp / "photos")
    (tmp / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = _quantize_cli(release, tmp / "photos")
    assert code == 0
    return release, photos


def _quantize_cli(release: Path, photos: Path) -> int:
    from models.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "edge-v2", "--release", str(release), "--calibration", str(photos)])
    return int(exit_info.value.code or 0)


def test_int8_file_is_registered_with_its_sha256(quantised: tuple[Path, list[Path]], tiny_release: Path) -> None:
    release, _ = quantised
    entry = Manifest.load(release).model("edge-v2")
    variant = entry.variants[INT8_VARIANT]
    path = release / variant.file
    assert path.is_file() and variant.file == "edge-v2.device-int8.onnx"
    assert variant.sha256 == sha256_file(path)
    assert (variant.batch, variant.precision) == (1, "int8")
    assert entry.variants["device-fp32"] == Manifest.load(tiny_release).model("edge-v2").variants["device-fp32"]
    raw = json.loads((release / "manifest.json").read_text())
    assert next(m for m in raw["models"] if m["id"] == "edge-v2")["variants"]["device-int8"]["precision"] == "int8"
    note = entry.card["quantization"]
    assert note["calibration_photos"] == 6  # the broken file was skipped, the six real photos used
    Release.load(release, verify=True)  # the whole release still verifies


def test_int8_graph_is_quantised_qdq_with_int8_weights(quantised: tuple[Path, list[Path]]) -> None:
    release, _ = quantised
    model = onnx.load(str(release / "edge-v2.device-int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 32, 32]


def test_int8_embeddings_are_unit_norm_and_close_to_fp32(quantised: tuple[Path, list[Path]]) -> None:
    release, photos = quantised
    loaded = Release.load(release, verify=True)
    int8 = loaded.encoder("edge-v2", INT8_VARIANT)
    fp32 = loaded.encoder("edge-v2", "device-fp32")
    images = [load_image(p) for p in photos]
    one = int8.encode_images(images[:1])
    assert one.shape == (1, 32)
    a, b = fp32.encode_images(images), int8.encode_images(images)
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() > 0.98, cosine
    assert not np.allclose(a, b, atol=1e-6)  # it is a different (quantised) graph, not a copy


def test_quantize_refuses_a_model_without_a_device_file(tiny_release: Path, sample_photos: dict[str, bytes],
                                                        tmp_path: Path) -> None:
    release = copy_release(tiny_release, tmp_path)
    photos = write_photos(sample_photos, tmp_path / "photos")
    with pytest.raises(QuantizeError, match="no 'device-fp32' variant"):
        quantize_model(release, "cloud-v2", photos)


def test_quantize_needs_one_readable_photo(tiny_release: Path, tmp_path: Path) -> None:
    release = copy_release(tiny_release, tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a nonsense")
    with pytest.raises(QuantizeError, match="none of the 1 calibration photos"):
        quantize_model(release, "edge-v1", [bad])
    assert "device-int8" not in Manifest.load(release).model("edge-v1").variants
    assert not (release / "edge-v1.device-int8.onnx").exists()


def test_quantize_command_names_a_missing_calibration_source(tiny_release: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    release = copy_release(tiny_release, tmp_path)
    code, _, err = run_cli(["quantize", "edge-v2", "--release", str(release), "--calibration",
                            str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "nowhere: no such folder or list file" in err


def test_list_file_resolves_caltech_style_paths(sample_photos: dict[str, bytes], tmp_path: Path) -> None:
    images = tmp_path / "data" / "101_ObjectCategories"
    for i, (name, data) in enumerate(sample_photos.items()):
        (images / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (images / f"class{i % 2}" / f"{name}.jpg").write_bytes(data)
    names = sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))
    listing = tmp_path / "data" / "train.txt"
    listing.write_text("\n".join(names) + "\n")
    found = list_photos(listing)
    assert [str(p.relative_to(images)) for p in found] == names
    three = list_photos(listing, count=3)
    assert len(three) == 3 and three[0] == found[0] and three[-1] == found[-1]
    listing.write_text("class0/missing.jpg\n")
    with pytest.raises(PhotoSourceError, match="1 of 1 listed photos are missing"):
        list_photos(listing, root=images)



def test_quantize_honours_the_integer_types(tiny_release: Path, sample_photos: dict[str, bytes],
                                            tmp_path: Path) -> None:
    release = copy_release(tiny_release, tmp_path)
    photos = write_photos(sample_photos, tmp_path / "photos")
    config = QuantizeConfig(activations="uint8", weights="uint8", reduce_range=False)
    result = quantize_model(release, "edge-v1", photos, config)
    model = onnx.load(str(release / result.file))
    types = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.UINT8 in types and onnx.TensorProto.INT8 not in types
    assert Manifest.load(release).model("edge-v1").card["quantization"]["weights"] == "uint8"
    with pytest.raises(QuantizeError, match="weights must be one of"):
        QuantizeConfig(weights="int4")


def test_float_blocks_keep_the_first_layers_in_float_and_the_rest_int8(sample_photos: dict[str, bytes],
                                                                       tmp_path: Path) -> None:
    from tests.export_helpers import report, small_encoder, train_config, write_checkpoint
    from training.export import export_release

    data = list(sample_photos.values())
    checkpoints = [write_checkpoint(tmp_path / "cloud-v1.pt", small_encoder(64, 1, data),
                                    train_config("cloud-v1", "cloud", 1, 64, [])),
                   write_checkpoint(tmp_path / "edge-v1.pt", small_encoder(64, 2, data),
                                    train_config("edge-v1", "edge", 1, 64, ["cloud-v1"]))]
    release = tmp_path / "release"
    export_release(checkpoints, release, data[:4], report({"cloud-v1": 0.80, "edge-v1": 0.79}))
    photos = write_photos(sample_photos, tmp_path / "photos")
    result = quantize_model(release, "edge-v1", photos, QuantizeConfig(float_blocks=2))
    graph = onnx.load(str(release / result.file)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv" and "fingerprint" not in node.name]
    stem = [node for node in convs if any(f"/{part}/" in node.name for part in ("_conv_stem", "_blocks.0", "_blocks.1"))
            ]  # not _blocks.10/
    assert stem and len(stem) < len(convs)
    assert all(made_by.get(node.input[1]) != "DequantizeLinear" for node in stem)  # float weights
    assert all(made_by.get(node.input[1]) == "DequantizeLinear" for node in convs if node not in stem)
    assert Manifest.load(release).model("edge-v1").card["quantization"]["float_blocks"] == 2
    vectors = Release.load(release, verify=True).encoder("edge-v1", INT8_VARIANT).encode_images(
        [load_image(p) for p in photos])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # the file runs and embeds
    with pytest.raises(QuantizeError, match="float_blocks counts trunk blocks"):
        QuantizeConfig(float_blocks=-1)


def test_a_quantisation_trial_leaves_the_release_it_was_made_from_as_it_was(tiny_release: Path,
                                                                           sample_photos: dict[str, bytes],
                                                                           tmp_path: Path) -> None:
    from training.bench.quant_select import linked_copy

    release = copy_release(tiny_release, tmp_path / "original")
    before = {p.name: p.read_bytes() for p in release.iterdir()}
    (tmp_path / "trial").mkdir()
    trial = linked_copy(release, tmp_path / "trial")
    result = quantize_model(trial, "edge-v2", write_photos(sample_photos, tmp_path / "photos"))
    assert (trial / result.file).is_file() and INT8_VARIANT in Manifest.load(trial).model("edge-v2").variants
    assert {p.name: p.read_bytes() for p in release.iterdir()} == before  # no new file, the manifest untouched


def test_a_rerun_of_one_quantisation_setting_keeps_the_other_settings_figures(tmp_path: Path) -> None:
    from training.bench.quant_select import record

    out = tmp_path / "quant-edge-v3.json"
    record(out, {"fp32": {"R@1": 0.6}, "0": {"R@1": 0.55}, "2": {"R@1": 0.58}, "10": {"R@1": 0.57}})
    record(out, {"fp32": {"R@1": 0.6}, "2": {"R@1": 0.59}, "1": {"R@1": 0.56}})
    kept = json.loads(out.read_text())
    assert kept == {"fp32": {"R@1": 0.6}, "0": {"R@1": 0.55}, "1": {"R@1": 0.56}, "2": {"R@1": 0.59},
                    "10": {"R@1": 0.57}}
    assert list(kept) == ["fp32", "0", "1", "2", "10"]  # the reference first, then by block count
