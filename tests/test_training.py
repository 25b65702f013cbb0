"""Training: strict pretrained loading, the benchmark split, the losses, and a tiny real training run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from models.benchmark.caltech import load_benchmark
from training.arch import ARCHS, build_encoder, pretrained_state_dict
from training.losses import Batch, Influence, Regression, extend_old_classifier
from training.trainer import TrainConfig, TrainData, embed_features, encoder_from_checkpoint, train


@pytest.mark.parametrize("arch, millions", [("lite0", 4.65), ("lite1", 5.42), ("lite2", 6.09)])
def test_pretrained_weights_load_strictly(arch: str, millions: float) -> None:
    encoder = build_encoder(arch, semantic_dim=16, hidden=0)
    params = sum(p.numel() for p in encoder.trunk.parameters()) / 1e6
    assert params == pytest.approx(millions, abs=0.01)
    state = pretrained_state_dict(arch)
    state.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        build_encoder(arch, semantic_dim=16, hidden=0, pretrained=False).trunk.load_state_dict(state, strict=True)


def test_pretrained_trunk_recognises_a_real_photo() -> None:
    """The ImageNet head on our trunk must call chelsea a cat: proves weights, padding and normalisation."""
    from skimage import data

    from models.preprocess import Preprocess, preprocess

    encoder = build_encoder("lite0", 224, semantic_dim=16, hidden=0).eval()
    image = Image.fromarray(data.chelsea())
    x = torch.from_numpy(preprocess(image, Preprocess(resize=224, crop=224)))[None]
    with torch.no_grad():
        logits = encoder.trunk._fc(encoder.forward_features(x))
    assert int(logits.argmax()) in range(281, 286)  # ImageNet's domestic cat classes


def test_encoder_output_is_unit_norm() -> None:
    encoder = build_encoder("lite0", 64, semantic_dim=32).eval()
    with torch.no_grad():
        out = encoder(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert set(ARCHS) == {"lite0", "lite1", "lite2"}


def test_joined_trunks_concatenate_their_pretrained_features() -> None:
    """`lite0+lite1` holds both ImageNet trunks unchanged: its features are theirs side by side, so a newer model
    can keep an older model's trunk beside a stronger one."""
    joined = build_encoder("lite0+lite1", 96, semantic_dim=16).eval()
    alone = [build_encoder(arch, 96, semantic_dim=16).eval() for arch in ("lite0", "lite1")]
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected = torch.cat([encoder.forward_features(x) for encoder in alone], dim=-1)
        assert torch.allclose(joined.forward_features(x), expected, atol=1e-5)
        assert joined(x).shape == (2, 16)
    with pytest.raises(KeyError, match="registered"):
        build_encoder("lite0+lite9")
    with pytest.raises(KeyError, match="distinct"):
        build_encoder("lite1+lite1")


@pytest.fixture(scope="module")
def benchmark_or_skip():  # type: ignore[no-untyped-def]
    try:
        return load_benchmark()
    except FileNotFoundError as err:
        pytest.skip(f"Caltech-101 is not here: {err}")


def test_split_is_deterministic_and_follows_the_protocol(benchmark_or_skip) -> None:  # type: ignore[no-untyped-def]
    first, second = benchmark_or_skip, load_benchmark()
    assert first.classes == second.classes and first.gallery.paths == second.gallery.paths
    assert len(first.classes) == 101 and "BACKGROUND_Google" not in first.classes
    assert list(first.classes) == sorted(first.classes)
    assert (len(first.train), len(first.gallery), len(first.queries)) == (5784, 6095, 2893)
    assert int((first.gallery.labels == -1).sum()) == 311
    assert set(first.training_set(50).labels.tolist()) == set(range(50))
    assert not set(first.gallery.paths) & set(first.queries.paths)


def _separable(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=gen)
    return torch.nn.functional.normalize(points, dim=1), labels


def test_bct_influence_is_small_for_the_old_model_and_grows_with_drift() -> None:
    embeddings, labels = _separable(num_classes=5, per_class=20, dim=16, seed=0)
    old_classifier = torch.stack([embeddings[labels == c].mean(0) for c in range(5)])
    loss = Influence(old_classifier, scale=16.0)
    batch = Batch(labels)
    gen = torch.Generator().manual_seed(1)
    drift = torch.randn(16, 16, generator=gen)
    values = []
    for amount in (0.0, 0.5, 1.0, 2.0):
        rotated = torch.nn.functional.normalize(embeddings @ (torch.eye(16) + amount * drift), dim=1)
        values.append(float(loss(rotated, batch)))
    assert values[0] < 0.05
    assert values == sorted(values) and values[-1] > 10 * values[0]


def test_old_classifier_rows_for_new_classes_are_mean_old_embeddings() -> None:
    embeddings, labels = _separable(num_classes=4, per_class=10, dim=8, seed=2)
    old = torch.randn(2, 8)
    extended = extend_old_classifier(old, embeddings, labels, num_classes=4)
    assert extended.shape == (4, 8)
    expected = torch.nn.functional.normalize(embeddings[labels == 3].mean(0), dim=0)
    assert torch.allclose(extended[3], expected, atol=1e-6)
    with pytest.raises(ValueError, match="class 4"):
        extend_old_classifier(old, embeddings, labels, num_classes=5)


def test_regression_is_zero_at_the_reference() -> None:
    embeddings, labels = _separable(3, 4, 8, seed=3)
    loss = Regression("cloud")
    assert float(loss(embeddings, Batch(labels, {"cloud": embeddings}))) == pytest.approx(0.0)
    assert float(loss(-embeddings, Batch(labels, {"cloud": embeddings}))) == pytest.approx(4.0)


def _photo_classes(folder: Path, per_class: int) -> tuple[list[str], np.ndarray]:
    """Augmented crops of bundled photos, one class per photo, written as JPEG files."""
    from skimage import data

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        for i in range(per_class):
            w, h = photo.size
            side = int(min(w, h) * rng.uniform(0.5, 0.8))
            x, y = rng.integers(0, w - side), rng.integers(0, h - side)
            crop = photo.crop((x, y, x + side, y + side))
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.6, 1.4))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=80)
            rel = f"{name}/{i:03d}.jpg"
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(buffer.getvalue())
            paths.append(rel)
            labels.append(label)
    return paths, np.array(labels)


def test_tiny_training_run_improves_its_own_metric(tmp_path: Path) -> None:
    from training.cache import compute_features, feature_matrix

    paths, labels = _photo_classes(tmp_path / "photos", per_class=12)
    table = compute_features(tmp_path / "photos", paths, "lite0", 96, "plain", tmp_path / "cache")
    feats = torch.from_numpy(feature_matrix(table, paths))
    train_idx = np.arange(len(paths)) % 3 != 0
    config = TrainConfig(model_id="tiny", role="cloud", version=1, arch="lite0", resolution=96, num_classes=4,
                         losses=[{"kind": "classification"}], semantic_dim=32, hidden=64, epochs=15, batch_size=16,
                         lr=3e-3, views=["plain"])  # type: ignore[list-item]
    data = TrainData(feats[train_idx][None], torch.from_numpy(labels[train_idx]))
    untrained = build_encoder("lite0", 96, semantic_dim=32, hidden=64)
    state = train(config, data, tmp_path / "tiny.pt", progress=False)
    trained = encoder_from_checkpoint(state)

    def held_out_accuracy(head_embeddings: torch.Tensor) -> float:
        assert state.classifier is not None
        classifier = torch.nn.functional.normalize(state.classifier, dim=1)
        predicted = (head_embeddings[~train_idx] @ classifier.T).argmax(1).numpy()
        return float((predicted == labels[~train_idx]).mean())

    before = held_out_accuracy(embed_features(untrained, feats))
    after = held_out_accuracy(embed_features(trained, feats))
    assert after >= 0.9 and after > before
    assert state.done and state.loss["classification"] < 1.0
    resumed = train(config, data, tmp_path / "tiny.pt", progress=False)  # a finished run is not redone
    assert resumed.epoch == config.epochs


def test_a_head_with_more_trunks_starts_as_its_parent_exactly() -> None:
    """init='parent': a lite0+lite1 head starts where the lite1 model it replaces is, so its first space is the
    old one (training only adds to it)."""
    from training.arch import feature_columns

    parent = build_encoder("lite1", 64, semantic_dim=8, hidden=16, pretrained=False).eval()
    child = build_encoder("lite0+lite1", 64, semantic_dim=8, hidden=16, pretrained=False).eval()
    child.head.start_from(parent.head, feature_columns("lite1", "lite0+lite1"))
    features = torch.randn(5, 2560)
    with torch.no_grad():
        assert torch.allclose(child.head(features), parent.head(features[:, 1280:]), atol=1e-6)
    with pytest.raises(ValueError, match="holds no"):
        feature_columns("lite2", "lite0+lite1")
