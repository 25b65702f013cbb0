"""Train one encoder's embedding head on cached frozen-trunk features, from one experiment config.

A checkpoint carries its own config and is written atomically at the end of every epoch, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import io
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.atomic import write_atomic
from training.arch import Encoder, build_encoder, feature_columns
from training.fingerprint import load_fingerprint
from training.losses import (
    Batch,
    Classification,
    FocalDistillation,
    Influence,
    Regression,
    Relational,
    Weighted,
    extend_old_classifier,
)

LOSS_KINDS = ("classification", "influence", "regression", "relational", "focal")
CLASS_LOSSES = ("classification", "influence")
PHOTOS = ("labelled", "gallery", "all")
INITS = ("random", "pca", "parent")
TRUNK = "trunk"
"""The reference name of the model's own frozen trunk features (centred), for the relational loss."""


@dataclass
class LossSpec:
    """One loss term: `reference` names the frozen model (checkpoint id) for influence and regression, and the
    frozen model or `trunk` (the model's own frozen trunk features) for the relational loss."""

    kind: str
    weight: float = 1.0
    reference: str = ""
    alpha: float = 0.1
    """focal only: the distillation weight of a photo the reference retrieved wrong (right ones: alpha + beta)."""
    beta: float = 1.0


@dataclass
class TrainConfig:
    """One experiment: the model's identity and lineage, its architecture, losses and schedule."""

    model_id: str
    role: str
    version: int
    arch: str
    resolution: int
    num_classes: int
    losses: list[LossSpec]
    parents: list[str] = field(default_factory=list)
    replaces: str = ""
    group: str = "main"
    space: str = "concord2"
    semantic_dim: int = 256
    """Width of the trained embedding; the stored vector adds the space's fingerprint (the manifest's `dim`)."""
    hidden: int = 512
    dropout: float = 0.1
    scale: float = 16.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 5
    photos: str = "labelled"
    """'labelled': the training photos of the first num_classes classes; 'gallery': every gallery photo the
    reference cloud model indexed, without labels (reference-based losses only); 'all': every gallery photo,
    labelled for the first num_classes classes and label-free otherwise (background, later classes)."""
    pool: bool = False
    """Add the open-world `pool` photos, label-free (never the `eval` photos)."""
    init: str = "random"
    """'random'; 'pca': the head starts as the partly whitened PCA of its training photos' trunk features;
    'parent': it starts as the model it replaces, exactly (its architecture must hold that model's trunks)."""
    whiten: float = 0.5
    """With init='pca': eigenvalue^(-whiten/2) scaling (0: plain PCA, 1: full whitening)."""
    views: list[str] = field(default_factory=lambda: ["plain", "flip"])
    """How each training photo is shown (training/cache.py VIEWS); a batch draws one view per photo."""
    distil_views: list[str] = field(default_factory=list)
    """Views whose targets (the frozen trunk's and reference models' vectors) are those of the plain photo, so the
    model learns to put e.g. a thumbnail where its full-size photo lands: the teacher sees the sharp photo."""

    def __post_init__(self) -> None:
        self.losses = [LossSpec(**spec) if isinstance(spec, dict) else spec for spec in self.losses]
        for spec in self.losses:
            if spec.kind not in LOSS_KINDS:
                raise ValueError(f"{self.model_id}: unknown loss {spec.kind!r}; known: {LOSS_KINDS}")
            if spec.kind != "classification" and not spec.reference:
                raise ValueError(f"{self.model_id}: loss {spec.kind!r} needs a reference model")
            if spec.reference == TRUNK and spec.kind != "relational":
                raise ValueError(f"{self.model_id}: only the relational loss takes the frozen trunk as reference")
            if self.photos == "gallery" and spec.kind in CLASS_LOSSES:
                raise ValueError(f"{self.model_id}: photos='gallery' has no labels; only reference-based losses apply")
        if self.photos not in PHOTOS:
            raise ValueError(f"{self.model_id}: photos must be one of {PHOTOS}, got {self.photos!r}")
        if self.init not in INITS:
            raise ValueError(f"{self.model_id}: init must be one of {INITS}, got {self.init!r}")
        if self.views[:1] != ["plain"] or not set(self.distil_views) <= set(self.views) - {"plain"}:
            raise ValueError(f"{self.model_id}: views must start with 'plain' and distil_views be other views of "
                             f"them, got views {self.views} and distil_views {self.distil_views}")
        if self.init == "parent" and not self.replaces:
            raise ValueError(f"{self.model_id}: init='parent' starts from the model it replaces; name it in 'replaces'")

    @property
    def references(self) -> list[str]:
        return list(dict.fromkeys(spec.reference for spec in self.losses if spec.reference))

    @property
    def focal_references(self) -> list[str]:
        """The models whose right answers a focal distillation term keeps."""
        return [spec.reference for spec in self.losses if spec.kind == "focal"]

    @property
    def target_views(self) -> list[int]:
        """For each view, the view whose reference vectors are its targets (plain, index 0, for a distil view)."""
        return [0 if view in self.distil_views else i for i, view in enumerate(self.views)]

    @property
    def has_class_loss(self) -> bool:
        """Whether a loss of the config uses labels."""
        return any(spec.kind in CLASS_LOSSES for spec in self.losses)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from its dict form (a TOML file, a checkpoint's `config`)."""
        return cls(**current_keys(data))

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with today's key names: the old `dim` is read as `semantic_dim`, so earlier checkpoints and
    configs load unchanged."""
    if "dim" not in data:
        return data
    if "semantic_dim" in data:
        raise ValueError("a config names both 'dim' (the old name of semantic_dim) and 'semantic_dim'")
    return {("semantic_dim" if k == "dim" else k): v for k, v in data.items()}


@dataclass
class TrainData:
    """Cached trunk features [views, N, 1280] of the training photos, their labels, and the frozen
    reference models' embeddings [views, N, semantic_dim] and classifiers of the same photos, by model id."""

    features: torch.Tensor
    labels: torch.Tensor
    references: dict[str, torch.Tensor] = field(default_factory=dict)
    classifiers: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per focal reference: whether it retrieved each training photo right (bool [N]; label-free: False)."""
    parent: Encoder | None = None
    """The replaced model, for init='parent'."""


def build_losses(config: TrainConfig, data: TrainData) -> Weighted:
    """The config's loss terms, with frozen reference classifiers extended to every training class."""
    terms: dict[str, tuple[float, nn.Module]] = {}
    for spec in config.losses:
        if spec.kind == "classification":
            loss: nn.Module = Classification(config.semantic_dim, config.num_classes, config.scale)
        elif spec.kind == "influence":
            old = extend_old_classifier(data.classifiers[spec.reference], data.references[spec.reference][0],
                                        data.labels, config.num_classes)
            loss = Influence(old, config.scale)
        elif spec.kind == "relational":
            loss = Relational(spec.reference)
        elif spec.kind == "focal":
            loss = FocalDistillation(spec.reference, spec.alpha, spec.beta)
        else:
            loss = Regression(spec.reference)
        terms[f"{spec.kind}:{spec.reference}" if spec.reference else spec.kind] = (spec.weight, loss)
    return Weighted(terms)


def classifier_weight(losses: Weighted) -> torch.Tensor | None:
    """The model's own trained classifier (kept in the checkpoint: later models' BCT needs it)."""
    for loss in losses.terms.values():
        if isinstance(loss, Classification):
            return loss.classifier.weight.detach().clone()
    return None


class CheckpointError(ValueError):
    """A file that is not a checkpoint of the trainer's format."""


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint: the config it was trained from, the encoder's weights, how far training got, the
    model's own classifier (later models' BCT needs it), and the optimiser's state to resume from."""

    config: TrainConfig
    model: dict[str, torch.Tensor]
    epoch: int = 0
    done: bool = False
    classifier: torch.Tensor | None = None
    loss: dict[str, float] = field(default_factory=dict)
    resume: dict[str, Any] = field(default_factory=dict)
    """State dicts of the losses, optimizer and scheduler, by those names."""

    RESUME_KEYS = ("losses", "optimizer", "scheduler")

    @classmethod
    def from_state(cls, state: Any, required: tuple[str, ...] = ()) -> Checkpoint:
        """Read the saved form (config as a dict); `required` names config keys that must be written out."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state:
            raise CheckpointError("a checkpoint must hold 'config' (dict) and 'model' (state dict)")
        try:
            data = current_keys(state["config"])
            missing = [key for key in required if key not in data]
            if missing:
                raise CheckpointError(f"its config lacks {missing}")
            config = TrainConfig.from_dict(data)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"its config is not a training config ({err})") from None
        return cls(config, state["model"], int(state.get("epoch") or 0), bool(state.get("done")),
                   state.get("classifier"), dict(state.get("loss") or {}),
                   {key: state[key] for key in cls.RESUME_KEYS if key in state})

    def to_state(self) -> dict[str, Any]:
        """The saved form: plain dicts and tensors, config as a dict."""
        return {"config": self.config.to_dict(), "model": self.model, **self.resume, "epoch": self.epoch,
                "classifier": self.classifier, "done": self.done, "loss": self.loss}


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a crash leaves the previous checkpoint or this one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint.to_state(), buffer)
    write_atomic(path, buffer.getbuffer())


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> Checkpoint:
    """The one reader of checkpoints (see `Checkpoint.from_state`)."""
    return Checkpoint.from_state(torch.load(path, map_location="cpu", weights_only=False), required)


def encoder_from_checkpoint(checkpoint: Checkpoint) -> Encoder:
    """Rebuild the (eval-mode) encoder a checkpoint describes (its config travels with it)."""
    cfg = checkpoint.config
    encoder = build_encoder(cfg.arch, cfg.resolution, cfg.semantic_dim, cfg.hidden, cfg.dropout, pretrained=False)
    encoder.load_state_dict(checkpoint.model)
    encoder.fingerprint = load_fingerprint(cfg.space)
    return encoder.eval()


@torch.no_grad()
def embed_features(encoder: Encoder, features: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Embeddings of cached trunk features through the encoder's head (eval mode)."""
    encoder.eval()
    return torch.cat([encoder.head(features[i:i + batch]) for i in range(0, len(features), batch)])


def train(config: TrainConfig, data: TrainData, checkpoint: Path, progress: bool = True) -> Checkpoint:
    """Train the head of `config`'s encoder on `data`; resume from `checkpoint` if it is unfinished."""
    torch.manual_seed(config.seed)
    encoder = build_encoder(config.arch, config.resolution, config.semantic_dim, config.hidden, config.dropout)
    if config.init == "pca":
        encoder.head.start_from_pca(data.features, config.whiten)
    elif config.init == "parent":
        if data.parent is None:
            raise ValueError(f"{config.model_id}: init='parent' needs the replaced model in the training data")
        encoder.head.start_from(data.parent.head, feature_columns(data.parent.arch, config.arch))
    losses = build_losses(config, data)
    params = [p for p in [*encoder.head.parameters(), *losses.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    num_views, num_photos = data.features.shape[:2]
    steps_per_epoch = (num_photos + config.batch_size - 1) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=0.1)
    start = 0
    if checkpoint.exists():
        previous = load_checkpoint(checkpoint)
        if previous.done:
            return previous
        encoder.load_state_dict(previous.model)
        losses.load_state_dict(previous.resume["losses"])
        optimizer.load_state_dict(previous.resume["optimizer"])
        scheduler.load_state_dict(previous.resume["scheduler"])
        start = previous.epoch
    generator = torch.Generator().manual_seed(config.seed + start)
    bar = tqdm(range(start, config.epochs), desc=config.model_id, unit="epoch", disable=not progress)
    saved: Checkpoint | None = None
    for epoch in bar:
        encoder.head.train()
        began, totals = time.perf_counter(), dict[str, float]()
        order = torch.randperm(num_photos, generator=generator)
        for i in range(0, num_photos, config.batch_size):
            idx = order[i:i + config.batch_size]
            view = torch.randint(num_views, (len(idx),), generator=generator)
            batch = Batch(data.labels[idx], {ref: emb[view, idx] for ref, emb in data.references.items()},
                          {ref: right[idx] for ref, right in data.right.items()})
            loss, parts = losses(encoder.head(data.features[view, idx]), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals = {k: totals.get(k, 0.0) + v * len(idx) / num_photos for k, v in parts.items()}
        rate = num_photos / (time.perf_counter() - began)
        bar.set_postfix({**{k.split(":")[0][:5]: f"{v:.3f}" for k, v in totals.items()}, "photo/s": f"{rate:.0f}"})
        saved = Checkpoint(config, encoder.state_dict(), epoch + 1, epoch + 1 == config.epochs,
                           classifier_weight(losses), totals,
                           {"losses": losses.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()})
        if saved.done or (epoch + 1) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, saved)
    assert saved is not None, "a resumed run has at least one epoch left"
    return saved
