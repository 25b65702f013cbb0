"""The space's photo fingerprint: model-independent, finds a photo's near-duplicate, survives export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.benchmark.transforms import near_duplicate
from models.preprocess import Preprocess, load_image, preprocess, preprocess_batch
from models.runtime import OnnxEncoder
from tests.export_helpers import train_config
from training.arch import build_encoder
from training.convert import to_onnx
from training.export import model_entry
from training.fingerprint import Fingerprint, FingerprintSpec, colour_layout, discriminant, load_fingerprint


@pytest.fixture(scope="module")
def fingerprint() -> Fingerprint:
    """The fitted fingerprint that ships with the training package for the main space."""
    fitted = load_fingerprint("concord2")
    assert fitted is not None, "training/spaces/concord2.npz is missing: run `concord fingerprint`"
    return fitted


def tensor(image: object, size: int) -> torch.Tensor:
    return torch.from_numpy(preprocess(image, Preprocess(resize=size, crop=size)))[None]  # type: ignore[arg-type]


def test_an_edge_sized_near_duplicate_finds_its_cloud_sized_original(fingerprint: Fingerprint,
                                                                      sample_photos: dict[str, bytes]) -> None:
    rng = np.random.default_rng(0)
    originals = [load_image(data) for data in sample_photos.values()]
    gallery = torch.cat([fingerprint(tensor(image, 240)) for image in originals])
    copies = [load_image(near_duplicate(image, rng)[0]) for image in originals]
    queries = torch.cat([fingerprint(tensor(image, 160)) for image in copies])
    similarity = queries @ gallery.T
    assert similarity.argmax(dim=1).tolist() == list(range(len(originals)))
    assert torch.allclose(gallery.norm(dim=1), torch.ones(len(originals)), atol=1e-5)


def test_every_input_size_of_the_chain_sees_the_same_fingerprint(fingerprint: Fingerprint,
                                                                 sample_photos: dict[str, bytes]) -> None:
    for data in sample_photos.values():
        image = load_image(data)
        small, medium, large = (fingerprint(tensor(image, size)) for size in (160, 240, 260))
        assert float((small * medium).sum()) > 0.95
        assert float((medium * large).sum()) > 0.95


def test_a_size_the_grid_cannot_pool_is_refused(fingerprint: Fingerprint) -> None:
    with pytest.raises(ValueError, match="multiple of 20"):
        fingerprint(torch.rand(1, 3, 250, 250))


def test_the_discriminant_ignores_what_copies_change() -> None:
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(500, 6))
    noise = np.zeros((500, 6))
    noise[:, :3] = rng.normal(scale=3.0, size=(500, 3))  # copies drift a lot along the first three axes
    copies = [originals + noise, originals - noise]
    mean, projection = discriminant(originals, copies, dims=3)
    assert projection.shape == (6, 3)
    assert np.abs(projection[:3]).max() < 0.1 * np.abs(projection[3:]).max()  # kept: the stable axes
    projected = (originals - mean) @ projection
    assert np.allclose(projected.std(axis=0), 1.0, atol=0.1)  # unit variance across photos


def test_the_encoder_appends_the_fingerprint_and_onnx_reproduces_it(fingerprint: Fingerprint,
                                                                    sample_photos: dict[str, bytes],
                                                                    tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("lite0", 160, semantic_dim=16, hidden=0, pretrained=False).eval()
    encoder.fingerprint = fingerprint
    images = preprocess_batch([load_image(d) for d in sample_photos.values()], Preprocess(resize=160, crop=160))
    with torch.no_grad():
        out = encoder(torch.from_numpy(images))
        alone = fingerprint(torch.from_numpy(images))
    spec = fingerprint.spec
    assert out.shape == (len(images), 16 + spec.dims)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    assert torch.allclose(out[:, 16:], alone * spec.weight ** 0.5, atol=1e-6)
    entry = model_entry(train_config("m", "edge", 1, 160, [], space="concord2"), spec)
    assert entry.dim == 16 + spec.dims
    got = OnnxEncoder(to_onnx(encoder, tmp_path / "m.onnx", 160), entry).encode_arrays(images)
    assert np.allclose(got, out.numpy(), atol=1e-4)


def test_the_raw_descriptor_is_a_histogram_per_cell() -> None:
    spec = FingerprintSpec()
    black = colour_layout(torch.zeros(1, 3, 40, 40), spec)
    assert black.shape == (1, spec.raw_dims)
    assert torch.allclose((black ** 2).reshape(spec.bins ** 3, spec.cells ** 2).sum(dim=0), torch.ones(4))
    assert float(black[0, 0]) == pytest.approx(1.0)  # every pixel in the darkest bin of every cell
