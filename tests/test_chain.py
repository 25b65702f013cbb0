"""The third generation's pieces: focal distillation, retrieved-right masks, the three-generation gallery,
the backfill curve and its fitted order, and restoring released heads into checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.benchmark.metrics import mixed_gallery
from models.manifest import BackfillScorer, Manifest, ManifestError
from tests.test_evaluate import bench as bench
from tests.test_evaluate import unit
from training.backfill import fit_scorer
from training.benchmark import retrieved_right
from training.evaluate import BackfillSpec, Labels, MixedSpec, ModelEmbeddings, Protocol, build_report
from training.losses import UNLABELLED, Batch, FocalDistillation

Bench = tuple[list[ModelEmbeddings], Labels]


def test_focal_distillation_weighs_the_photos_the_old_model_got_right() -> None:
    new, old = torch.zeros(2, 4), torch.zeros(2, 4)
    new[:, 0] = 1.0
    right = torch.tensor([True, False])
    loss = FocalDistillation("cloud-v2", alpha=0.5, beta=2.0)
    got = loss(new, Batch(torch.zeros(2), {"cloud-v2": old}, {"cloud-v2": right}))
    assert float(got) == pytest.approx((2.5 * 1.0 + 0.5 * 1.0) / 2)
    assert float(loss(old, Batch(torch.zeros(2), {"cloud-v2": old}, {"cloud-v2": right}))) == 0.0


def test_retrieved_right_is_the_leave_one_out_top1_of_labelled_photos() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.98, 0.05]])
    labels = torch.tensor([0, 0, 1, 0, UNLABELLED])
    # photo 3 (label 0) is nearest to photo 2 (label 1): wrong; the label-free photo is never "right"
    assert retrieved_right(embeddings, labels).tolist() == [True, True, False, False, False]


def test_three_generation_gallery_holds_each_model_in_its_share(bench: Bench) -> None:
    models, labels = bench
    spec = MixedSpec("cloud-v2", "cloud-v2-l2", ("cloud-v2",), shares=(0.0, 0.5, 1.0), oldest="cloud-v1",
                     oldest_share=0.5)
    mixed = build_report(models, labels, Protocol(chain_mixed=spec))["mixed_chain"]
    by_id = {m.id: m for m in models}
    start = mixed_gallery(by_id["cloud-v2"].gallery, by_id["cloud-v1"].gallery, 0.5, 1)  # type: ignore[arg-type]
    from_v1 = np.all(start == by_id["cloud-v1"].gallery, axis=1)
    assert from_v1.mean() == pytest.approx(0.5, abs=0.01)
    assert mixed["oldest"] == "cloud-v1" and mixed["shares"] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="oldest"):
        MixedSpec("cloud-v2", "cloud-v3", (), oldest="cloud-v1")


def test_backfill_in_a_good_order_reaches_the_end_sooner_than_at_random(bench: Bench) -> None:
    models, labels = bench
    by_id = {m.id: m for m in models}
    start = MixedSpec("cloud-v1", "cloud-v2", (), shares=(0.0,))
    old, new = by_id["cloud-v1"].gallery, by_id["cloud-v2"].gallery
    assert old is not None and new is not None
    moved = 1.0 - np.sum(old * new, axis=1)
    spec = BackfillSpec(start, moved, ("cloud-v2",))
    curve = build_report(models, labels, Protocol(backfill=spec))["backfill"]["curves"][0]
    ordered, random = curve["ordered"]["recall@1"], curve["random"]["recall@1"]
    assert ordered[0] == random[0] and ordered[-1] == random[-1]
    assert ordered[-1] > ordered[0]
    assert curve["ordered"]["reaches_full_at"] <= curve["random"]["reaches_full_at"]


def test_fitted_scorer_predicts_how_far_the_new_model_moves_a_vector() -> None:
    rng = np.random.default_rng(0)
    old = unit(rng.normal(size=(2000, 16)))
    drift = np.clip(old[:, 0], 0, None)[:, None] * rng.normal(size=(2000, 16)) * 2.0  # photos with x0 > 0 move
    scorer, rho = fit_scorer(old, unit(old + drift))
    assert rho > 0.5
    assert scorer.score(old[old[:, 0] > 0.5]).mean() > scorer.score(old[old[:, 0] < -0.5]).mean()


def test_manifest_backfill_scorers_round_trip_and_are_checked(tmp_path: Path) -> None:
    release = Manifest.load(Path("models/release"))
    data = release.to_dict()
    entry = next(m for m in data["models"] if m["id"] == "cloud-v2")
    entry["backfill"] = {"cloud-v1": {"weights": [0.5] * entry["dim"], "bias": 0.1}}
    loaded = Manifest.from_dict(data)
    assert loaded.model("cloud-v2").backfill["cloud-v1"] == BackfillScorer((0.5,) * entry["dim"], 0.1)
    assert Manifest.from_dict(loaded.to_dict()).model("cloud-v2").backfill == loaded.model("cloud-v2").backfill
    entry["backfill"] = {"cloud-v1": {"weights": [0.5] * 3, "bias": 0.1}}
    with pytest.raises(ManifestError, match="finite weights"):
        Manifest.from_dict(data)
    entry["backfill"] = {"cloud-v9": {"weights": [0.5] * entry["dim"], "bias": 0.1}}
    with pytest.raises(ManifestError, match="cloud-v9"):
        Manifest.from_dict(data)


def test_onnx_weights_reads_plain_fp16_and_int8_weights(tmp_path: Path) -> None:
    from training.convert import to_onnx
    from training.restore import onnx_weights

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 8 * 8, 5)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.linear(image.flatten(1))

    module = Head()
    weights = onnx_weights(to_onnx(module, tmp_path / "m.onnx", resolution=8))
    assert np.allclose(weights["linear.weight"], module.linear.weight.detach().numpy())
    shipped = onnx_weights(Path("models/release/edge-v2.device-int8.onnx"))  # int8, dequantised
    assert shipped["head.linear.weight"].dtype == np.float32 and shipped["head.linear.weight"].shape[0] == 256
    halved = onnx_weights(Path("models/release/cloud-v2.server-fp16.onnx"))  # fp16-stored, cast back
    assert halved["head.linear.weight"].shape == (256, 2560)
