"""Losses as small composable modules; each takes the model's embeddings and the batch it came from.

- `Classification`: normalised-softmax (cosine) classifier on the embedding, trained with the model.
- `Influence` (BCT, Shen et al. 2020): classification through a FROZEN old classifier, so new embeddings
  stay where the old model's decision regions are. Classes the old model never saw get the mean
  old-model embedding of their training photos as their row.
- `Regression`: feature regression (squared L2 between unit vectors) to a frozen reference encoder's
  embeddings of the same photos, e.g. an edge model towards the cloud model of its version.
- `FocalDistillation` (positive-congruent training, Yan et al. 2021): feature distillation to the model being
  replaced, weighted up on the photos that model retrieved right, so an upgrade keeps its right answers
  (fewer negative flips) while the other losses improve the rest.
- `Relational`: similarity preservation: the batch's cosine-similarity matrix follows a frozen reference's
  (e.g. the model's own frozen trunk features), so the head keeps the trunk's general structure on
  photos of any category while the class losses sharpen it.

Photos without a label (label -1: label-free photos such as the open-world pool) count for the
reference-based losses only; the class losses skip them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    """One training batch: labels, and reference-model embeddings of the same photos by model id."""

    labels: torch.Tensor
    references: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per reference model id: whether that model retrieved each photo right (bool [batch]), for focal terms."""


class CosineClassifier(nn.Module):
    """Logits = scale * cos(embedding, class weight): the classifier head kept apart from the encoder."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, weight: torch.Tensor | None = None,
                 trainable: bool = True) -> None:
        super().__init__()
        init = weight.clone() if weight is not None else torch.randn(num_classes, dim) * 0.01
        self.weight = nn.Parameter(init, requires_grad=trainable)
        self.scale = scale

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T


UNLABELLED = -1
"""Label of a label-free training photo."""


def labelled_cross_entropy(logits_of: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                           smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled photos of the batch only (zero when it has none)."""
    keep = labels != UNLABELLED
    if not bool(keep.any()):
        return embeddings.sum() * 0.0
    return F.cross_entropy(logits_of(embeddings[keep]), labels[keep], label_smoothing=smoothing)


class Classification(nn.Module):
    """Cross-entropy of the model's own (trainable) cosine classifier, over the labelled photos."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, smoothing: float = 0.1) -> None:
        super().__init__()
        self.classifier = CosineClassifier(dim, num_classes, scale)
        self.smoothing = smoothing

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
        return labelled_cross_entropy(self.classifier, embeddings, batch.labels, self.smoothing)


def extend_old_classifier(old_weight: torch.Tensor, old_embeddings: torch.Tensor, labels: torch.Tensor,
                          num_classes: int) -> torch.Tensor:
    """Old classifier rows for every class: old rows kept, new classes = mean old embedding of their photos."""
    rows = [F.normalize(old_weight, dim=-1)]
    for cls in range(old_weight.shape[0], num_classes):
        members = old_embeddings[labels == cls]
        if len(members) == 0:
            raise ValueError(f"class {cls} has no training photo to build its old-classifier row")
        rows.append(F.normalize(members.mean(dim=0, keepdim=True), dim=-1))
    return torch.cat(rows)


class Influence(nn.Module):
    """BCT influence loss: cross-entropy of the new embedding through the frozen old classifier."""

    def __init__(self, old_classifier: torch.Tensor, scale: float = 16.0) -> None:
        super().__init__()
        self.classifier = CosineClassifier(old_classifier.shape[1], old_classifier.shape[0], scale,
                                           weight=old_classifier, trainable=False)

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
        return labelled_cross_entropy(self.classifier, embeddings, batch.labels)


class Regression(nn.Module):
    """Squared L2 distance to a frozen reference model's unit embeddings of the same photos."""

    def __init__(self, reference: str) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch.references[self.reference]
        return (embeddings - target).pow(2).sum(dim=-1).mean()


class FocalDistillation(nn.Module):
    """Squared L2 to the replaced model's unit embeddings, per photo weighted `alpha + beta * right`: every photo
    is pulled a little towards where the old model put it, the ones it retrieved right strongly."""

    def __init__(self, reference: str, alpha: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        self.reference, self.alpha, self.beta = reference, alpha, beta

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
        weight = self.alpha + self.beta * batch.right[self.reference].to(embeddings.dtype)
        return (weight * (embeddings - batch.references[self.reference]).pow(2).sum(dim=-1)).mean()


class Relational(nn.Module):
    """Similarity preservation: mean squared difference between the batch's cosine-similarity matrix and the
    frozen reference's of the same photos (off-diagonal pairs; the reference may have another width)."""

    def __init__(self, reference: str) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
        if len(embeddings) < 2:
            return embeddings.sum() * 0.0
        target = F.normalize(batch.references[self.reference], dim=-1)
        own = F.normalize(embeddings, dim=-1)
        off = ~torch.eye(len(own), dtype=torch.bool, device=own.device)
        return (own @ own.T - target @ target.T)[off].pow(2).mean()


class Weighted(nn.Module):
    """A sum of named losses with weights; returns the total and each term for the progress bar."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})

    def forward(self, embeddings: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        parts = {name: loss(embeddings, batch) for name, loss in self.terms.items()}
        total = sum((self.weights[name] * value for name, value in parts.items()), torch.zeros(()))
        return total, {name: float(value.detach()) for name, value in parts.items()}
