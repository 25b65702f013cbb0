"""The open-world recipe's pieces: label-free photos in the class losses, the relational loss, the PCA start of
the head, the configs that name them, and the training photos the benchmark assembles (on data the tests make)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.benchmark.caltech import load_benchmark
from models.benchmark.open_world import load_open_world
from tests.caltech_helpers import make_caltech, make_open_world
from training.arch import EmbeddingHead
from training.bench.pool_select import across_seeds, inherited, seeds_table, split_caltech
from training.benchmark import Paths, recipe_config, training_sources
from training.losses import UNLABELLED, Batch, Classification, Influence, Relational
from training.trainer import TRUNK, TrainConfig


@torch.no_grad()
def test_class_losses_skip_label_free_photos() -> None:
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 1, UNLABELLED, 2, UNLABELLED, 1])
    keep = labels != UNLABELLED
    loss = Classification(8, 3)
    assert float(loss(embeddings, Batch(labels))) == pytest.approx(float(loss(embeddings[keep], Batch(labels[keep]))))
    influence = Influence(torch.randn(3, 8))
    assert float(influence(embeddings, Batch(labels))) == pytest.approx(
        float(influence(embeddings[keep], Batch(labels[keep]))))
    none = torch.full((6,), UNLABELLED)
    assert float(loss(embeddings, Batch(none))) == 0.0 and float(influence(embeddings, Batch(none))) == 0.0


def test_relational_loss_is_zero_for_a_rotation_and_grows_when_structure_is_lost() -> None:
    generator = torch.Generator().manual_seed(1)
    trunk = torch.randn(32, 20, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator))
    loss = Relational(TRUNK)
    same = float(loss(torch.nn.functional.normalize(trunk @ rotation, dim=1), Batch(torch.zeros(32), {TRUNK: trunk})))
    shuffled = trunk[torch.randperm(32, generator=generator)]
    lost = float(loss(torch.nn.functional.normalize(shuffled, dim=1), Batch(torch.zeros(32), {TRUNK: trunk})))
    assert same == pytest.approx(0.0, abs=1e-10) and lost > 0.01
    assert float(loss(trunk[:1], Batch(torch.zeros(1), {TRUNK: trunk[:1]}))) == 0.0


def test_pca_start_ranks_photos_as_the_whitened_trunk_does() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 400, 1280, generator=generator) @ torch.diag(torch.linspace(3, 0.1, 1280))
    head = EmbeddingHead(16, hidden=32)
    head.start_from_pca(features, whiten=0.0)
    out = head(features[0])
    x = features.reshape(-1, 1280).double()
    centred = (features[0].double() - x.mean(0))
    _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    expected = torch.nn.functional.normalize(centred @ vt[:16].T, dim=1).float()
    assert torch.allclose((out @ out.T), (expected @ expected.T), atol=1e-3)  # same space up to signs


def test_configs_name_the_trunk_and_the_new_photo_sets() -> None:
    config = recipe_config("cloud-v1")
    assert config.init == "pca" and config.pool and config.photos == "all" and TRUNK in config.references
    with pytest.raises(ValueError, match="only the relational loss"):
        TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=96, num_classes=2,
                    losses=[{"kind": "regression", "reference": TRUNK}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=96, num_classes=2,
                    losses=[{"kind": "classification"}], init="cca")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no labels"):
        TrainConfig(model_id="x", role="edge", version=1, arch="lite0", resolution=96, num_classes=2,
                    photos="gallery", losses=[{"kind": "classification"}])  # type: ignore[list-item]


def test_training_photos_add_the_pool_label_free_and_never_eval(tmp_path: Path) -> None:
    bench = load_benchmark(make_caltech(tmp_path / "caltech", classes=4, train=3, test=2))
    world = load_open_world(make_open_world(tmp_path / "open", pool=2, evaluation=2, photos=3))
    config = TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=96, num_classes=2,
                         photos="all", pool=True, losses=[{"kind": "classification"}])  # type: ignore[list-item]
    caltech, pool = training_sources(config, bench, world, Paths(cache=tmp_path / "cache"))
    assert caltech.photos.paths == bench.gallery.paths
    labels = caltech.photos.labels
    assert set(labels[(bench.gallery.labels >= 0) & (bench.gallery.labels < 2)].tolist()) == {0, 1}
    assert (labels[(bench.gallery.labels >= 2) | (bench.gallery.labels < 0)] == UNLABELLED).all()
    assert pool.photos.paths == world.pool.paths and (pool.photos.labels == UNLABELLED).all()
    assert not set(pool.photos.paths) & set(world.eval.paths)
    assert pool.cache == tmp_path / "cache" / "open-world" and pool.image_dir == world.image_dir
    labelled = TrainConfig(model_id="y", role="cloud", version=1, arch="lite0", resolution=96, num_classes=2,
                           losses=[{"kind": "classification"}])  # type: ignore[list-item]
    (only,) = training_sources(labelled, bench, None, Paths(cache=tmp_path / "cache"))
    assert len(only.photos) == int((bench.train.labels < 2).sum())
    with pytest.raises(RuntimeError, match="open-world set is needed"):
        training_sources(config, bench, None, Paths())
    np.testing.assert_array_equal(only.photos.labels, bench.training_set(2).labels)


def test_caltech_validation_photos_never_train_and_the_test_photos_stay_out(tmp_path: Path) -> None:
    bench = load_benchmark(make_caltech(tmp_path / "caltech", classes=3, train=8, test=2))
    split = split_caltech(bench)
    held = split.queries
    assert len(held) == 3 * 2 and set(held.labels.tolist()) == {0, 1, 2}
    assert not set(held.paths) & set(split.gallery.paths) and not set(held.paths) & set(split.train.paths)
    assert not set(held.paths) & set(bench.queries.paths)
    assert set(split.gallery.paths) | set(held.paths) == set(bench.gallery.paths)
    assert (split.gallery.labels == -1).sum() == (bench.gallery.labels == -1).sum()
    config = TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=96, num_classes=3,
                         photos="all", losses=[{"kind": "classification"}])  # type: ignore[list-item]
    (caltech,) = training_sources(config, split, None, Paths(cache=tmp_path / "cache"))
    assert not set(caltech.photos.paths) & set(held.paths)


def test_a_thumbnail_view_learns_towards_its_full_photos_targets(tmp_path: Path) -> None:
    from PIL import Image

    from training.benchmark import training_data
    from training.cache import LOW_SIDE, _load_view, thumbnail

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    small = thumbnail(photo)
    assert small.size == (LOW_SIDE, LOW_SIDE)
    np.testing.assert_array_equal(np.asarray(small), np.asarray(photo.crop((30, 0, 120, 90)).resize(
        (LOW_SIDE, LOW_SIDE), Image.Resampling.BOX)))
    with pytest.raises(ValueError, match="unknown view"):
        _load_view(tmp_path, "x.jpg", None, "blurred")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="views must start with 'plain'"):
        TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=64, num_classes=2,
                    losses=[{"kind": "classification"}], distil_views=["low"])  # type: ignore[list-item]

    bench = load_benchmark(make_caltech(tmp_path / "caltech", classes=2, train=2, test=1, size=256))
    config = TrainConfig(model_id="x", role="cloud", version=1, arch="lite0", resolution=128, num_classes=2,
                         views=["plain", "low", "flip"], distil_views=["low"],
                         losses=[{"kind": "relational", "reference": TRUNK}])  # type: ignore[list-item]
    assert config.target_views == [0, 0, 2]
    data = training_data(config, bench, Paths(cache=tmp_path / "cache"))
    plain, low, flip = data.features
    assert not torch.allclose(low, plain)  # the model sees the thumbnail...
    target = data.references[TRUNK]
    torch.testing.assert_close(target[1], target[0])  # ...and learns towards the full photo's trunk features
    torch.testing.assert_close(target[0] - target[2], plain - flip)


def test_across_seeds_gives_each_figures_spread_and_the_flips_between_every_pair_of_seeds() -> None:
    """What retraining alone moves: a figure's median and range over the seeds, and for each pair of seeds the
    queries one got right and the other wrong (NFR) and the reverse (PFR), per query set and gallery; the table
    puts the flips beside that gallery's Recall@1."""
    runs = [{"-> g R@1": 0.5}, {"-> g R@1": 0.7}, {"-> g R@1": 0.6}]
    right = np.array([True, True, False, False])
    hits = [{"-> g": right}, {"-> g": np.array([True, False, True, False])}, {"-> g": right}]
    summary = across_seeds(runs, hits)
    assert (summary["-> g R@1 median"], summary["-> g R@1 min"], summary["-> g R@1 max"]) == (0.6, 0.5, 0.7)
    assert (summary["seed +0 vs +1 -> g NFR"], summary["seed +0 vs +1 -> g PFR"]) == (0.25, 0.25)
    assert (summary["seed +0 vs +2 -> g NFR"], summary["seed +0 vs +2 -> g PFR"]) == (0.0, 0.0)
    assert (summary["seed +1 vs +2 -> g NFR"], summary["seed +1 vs +2 -> g PFR"]) == (0.25, 0.25)
    table = seeds_table("x", runs, summary).splitlines()
    assert table[-1] == "| -> g R@1 | 0.6000 | 0.5000-0.7000 | 0.250 / 0.250 | 0.000 / 0.000 | 0.250 / 0.250 |"


def test_inherited_is_the_share_of_negative_flips_the_gallery_model_also_misses() -> None:
    replaced = np.array([True, True, True, True, False])
    candidate = np.array([False, False, False, True, True])  # three negative flips: queries 0, 1, 2
    gallery_model = np.array([False, True, True, False, False])  # misses query 0 of them (and 3, 4: not flips)
    assert inherited(replaced, candidate, gallery_model) == pytest.approx(1 / 3)
    assert np.isnan(inherited(replaced, replaced, gallery_model))
