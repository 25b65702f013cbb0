"""Shared fixtures: a tiny but real release (ONNX encoders exported here) for server and edge tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.manifest import Fingerprint, Manifest, ModelEntry, ModelFile, Space
from models.preprocess import Preprocess
from models.release import sha256_file

TINY_DIM = 32
SPACE = "tiny"
TINY_FINGERPRINT = Fingerprint(dims=48, weight=0.02, duplicate_weight=0.98, kind="tiny-colour-layout")
"""The tiny photo fingerprint: a 4x4 colour layout (3 x 16 values), mean-removed and unit, as in `Fingerprinted`."""


class TinyEncoder(nn.Module):
    """A real image encoder small enough for tests: 8x8 colour layout -> linear -> unit norm.

    Every model shares one base projection; `drift` adds a model-specific perturbation, so models of
    one lineage stay compatible (small drift) and an 'independent' model is not (drift = 1).
    """

    def __init__(self, seed: int, drift: float) -> None:
        super().__init__()
        base = torch.Generator().manual_seed(0)
        own = torch.Generator().manual_seed(seed)
        weight = torch.randn(TINY_DIM, 3 * 64, generator=base)
        noise = torch.randn(TINY_DIM, 3 * 64, generator=own)
        self.proj = nn.Parameter((1 - drift) * weight + drift * noise, requires_grad=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image * 255.0 - 127.0) / 128.0
        x = F.adaptive_avg_pool2d(x, 8).flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        return F.normalize(x @ self.proj.T, dim=-1)


class Fingerprinted(nn.Module):
    """A model of a fingerprinted space: concat(sqrt(1-w) * semantic, sqrt(w) * fingerprint), the fingerprint a
    4x4 colour layout of the pixels that is the same for every model (each resolution pools to the same 4x4)."""

    def __init__(self, semantic: nn.Module, weight: float) -> None:
        super().__init__()
        self.semantic = semantic
        self.weight = weight

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        layout = F.adaptive_avg_pool2d(image, 4).flatten(1)
        fingerprint = F.normalize(layout - layout.mean(dim=1, keepdim=True), dim=-1)
        return torch.cat([(1 - self.weight) ** 0.5 * self.semantic(image), self.weight ** 0.5 * fingerprint], dim=1)


TINY_MODELS = [
    # id, role, version, parents, resolution, seed, drift
    ("cloud-v1", "cloud", 1, [], 64, 1, 0.0),
    ("edge-v1", "edge", 1, ["cloud-v1"], 32, 2, 0.02),
    ("cloud-v2", "cloud", 2, ["cloud-v1"], 64, 3, 0.05),
    ("edge-v2", "edge", 2, ["cloud-v2", "edge-v1"], 32, 4, 0.06),
]


def tiny_metrics(model_id: str) -> dict[str, object]:
    """Figures shaped like the benchmark's, chosen so the lineage passes the compatibility gate."""
    figures = {"cloud-v1": 0.80, "edge-v1": 0.78, "cloud-v2": 0.90, "edge-v2": 0.88}
    matrix = {q: {g: {"recall@1": figures[q] - (0.0 if g == "cloud-v2" else 0.02),
                      "recall@5": 0.95, "map": figures[q] - 0.2}
                  for g in ("cloud-v1", "cloud-v2")}
              for q in figures}
    return {"benchmark": "tiny", "matrix": matrix}


def build_tiny_release(folder: Path, fingerprint: Fingerprint | None = None) -> Path:
    """Export the four tiny models (server fp32 + device batch-1 files) and write manifest.json; with a
    `fingerprint`, every model appends it (`Fingerprinted`) and the space declares it."""
    folder.mkdir(parents=True, exist_ok=True)
    from training.convert import to_onnx

    dim = TINY_DIM + (fingerprint.dims if fingerprint else 0)
    entries = {}
    for model_id, role, version, parents, resolution, seed, drift in TINY_MODELS:
        module: nn.Module = TinyEncoder(seed, drift)
        if fingerprint:
            module = Fingerprinted(module, fingerprint.weight)
        server = to_onnx(module, folder / f"{model_id}.onnx", resolution)
        variants = {}
        if role == "edge":
            device = to_onnx(module, folder / f"{model_id}.device.onnx", resolution, batch=1)
            variants["device-fp32"] = ModelFile(device.name, sha256_file(device), batch=1)
        entries[model_id] = ModelEntry(
            id=model_id, role=role, space=SPACE, dim=dim, version=version, parents=tuple(parents),
            file=server.name, sha256=sha256_file(server),
            preprocess=Preprocess(resize=resolution, crop=resolution), arch="tiny",
            variants=variants, metrics=tiny_metrics(model_id), card={"note": "test model"},
        )
    manifest = Manifest(spaces={SPACE: Space(SPACE, dim, fingerprint=fingerprint)}, models=entries,
                        release="tiny-fingerprint-test" if fingerprint else "tiny-test")
    manifest.save(folder / "manifest.json")
    return folder


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release folder of four tiny compatible ONNX models (never modify it; copy it to tamper)."""
    return build_tiny_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="session")
def fingerprinted_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny release whose models append a real photo fingerprint (`TINY_FINGERPRINT`; never modify it)."""
    return build_tiny_release(tmp_path_factory.mktemp("fingerprinted"), TINY_FINGERPRINT)


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, as JPEG bytes."""
    import io

    from skimage import data

    photos = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"):
        array = np.asarray(getattr(data, name)())
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=90)
        photos[name] = buffer.getvalue()
    return photos


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Milvus standalone server (PyPI `milvus`), in its own process group, on 127.0.0.1; ended with it."""
    from server.bench.milvus_server import MilvusServer

    server = MilvusServer(tmp_path_factory.mktemp("milvus-standalone"))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=2.0)  # nothing of a test collection needs a clean shutdown
