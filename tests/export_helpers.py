"""Helpers shared by the export and preprocessing tests: small real EfficientNet-Lite encoders and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.preprocess import Preprocess, load_image, preprocess
from training.arch import Encoder, build_encoder
from training.trainer import TrainConfig

DIM = 16


def small_encoder(resolution: int, seed: int, photos: list[bytes]) -> Encoder:
    """A Lite0 encoder (random weights, no pretrained download) whose BatchNorm statistics are measured on
    `photos`, so its embeddings differ from photo to photo as a trained model's do."""
    torch.manual_seed(seed)
    encoder = build_encoder("lite0", resolution, semantic_dim=DIM, hidden=0, pretrained=False)
    spec = Preprocess(resolution, resolution)
    batch = torch.from_numpy(np.stack([preprocess(load_image(p), spec) for p in photos]))
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration pass
    encoder.train()
    with torch.no_grad():
        encoder(batch)
    for norm in norms:
        norm.momentum = 0.01
    return encoder.eval()


def train_config(model_id: str, role: str, version: int, resolution: int, parents: list[str],
                 replaces: str = "", space: str = "test") -> TrainConfig:
    """A trainer config of a small Lite0 model."""
    return TrainConfig(model_id=model_id, role=role, version=version, arch="lite0", resolution=resolution,
                       num_classes=5, losses=[{"kind": "classification"}],  # type: ignore[list-item]
                       parents=parents, replaces=replaces, space=space, semantic_dim=DIM, hidden=0)


def write_checkpoint(path: Path, encoder: Encoder, config: TrainConfig | dict[str, Any], done: bool = True) -> Path:
    """A checkpoint in the trainer's format (config as a dict, as the trainer saves it; a dict may be broken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = config.to_dict() if isinstance(config, TrainConfig) else config
    torch.save({"config": config, "model": encoder.state_dict(), "done": done, "epoch": 1}, path)
    return path


def report(figures: dict[str, float], benchmark: str = "test") -> dict[str, Any]:
    """An evaluation report: M(q, q) Recall@1 is figures[q], M(q, g) 0.01 less for another gallery g."""
    return {"benchmark": benchmark, "matrix": {
        q: {g: {"recall@1": fq - (0.0 if g == q else 0.01), "recall@5": 0.95, "map": fq - 0.2}
            for g in figures} for q, fq in figures.items()}}
