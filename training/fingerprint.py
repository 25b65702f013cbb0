"""The space's photo fingerprint: a model-independent colour-layout descriptor every encoder appends.

Class-trained embeddings put every photo of a category close together, so they cannot tell a photo
from its cropped, resized, re-compressed copy (Recall@1 0.2 across models). The fingerprint can: a soft
joint RGB histogram (4 bins per channel) of each quarter of the centre crop, pooled to 20x20 pixels
first so that every input resolution divisible by 20 gives nearly the same numbers, square-rooted
(Hellinger), centred and projected by a discriminant fitted once per space on training photos and their
near-duplicates (directions that separate photos, whitened against what re-compression changes).

Every model of a space carries the SAME fingerprint inside its ONNX graph, so an edge query and a cloud
gallery vector agree on it exactly. The output of an encoder is `[sqrt(1-w) * semantic, sqrt(w) * fp]`:
with a small w ordinary search stays semantic; a duplicate query re-weights its own vector
(`models.match`) without touching what the gallery stores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

KIND = "colour-layout-v1"


@dataclass(frozen=True)
class FingerprintSpec:
    """The descriptor's shape and its place in the space: bins per channel, grid cells, pooled size, dims, weights."""

    bins: int = 4
    cells: int = 2
    size: int = 20
    dims: int = 128
    weight: float = 0.02
    """Share of a stored vector's squared norm that is fingerprint (small: search stays semantic)."""
    duplicate_weight: float = 0.98
    """The share a duplicate query gives it; 1 - weight makes fingerprint and semantics count equally."""
    kind: str = KIND

    @property
    def raw_dims(self) -> int:
        return self.bins ** 3 * self.cells ** 2

    def manifest(self) -> dict[str, object]:
        """The space entry's `fingerprint` field of a release manifest."""
        return {"dims": self.dims, "weight": self.weight, "duplicate_weight": self.duplicate_weight, "kind": self.kind}


def colour_layout(image: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """Square-rooted soft joint colour histograms of the grid cells [N, bins^3 * cells^2] (the raw descriptor)."""
    resolution = image.shape[-1]
    if resolution % spec.size or image.shape[-2] != resolution:
        raise ValueError(f"fingerprint: input {tuple(image.shape[-2:])} must be square and a multiple of "
                         f"{spec.size} px")
    small = F.avg_pool2d(image, resolution // spec.size)
    centres = torch.arange(spec.bins, dtype=image.dtype).view(1, 1, -1, 1, 1)
    weights = F.relu(1 - (small.unsqueeze(2) * (spec.bins - 1) - centres).abs())  # N, 3, bins, S, S
    red, green, blue = weights[:, 0], weights[:, 1], weights[:, 2]
    joint = red[:, :, None, None] * green[:, None, :, None] * blue[:, None, None, :]
    joint = joint.reshape(image.shape[0], spec.bins ** 3, spec.size, spec.size)
    return F.avg_pool2d(joint, spec.size // spec.cells).flatten(1).clamp_min(0).sqrt()


class Fingerprint(nn.Module):
    """image [N, 3, R, R] in [0, 1] -> unit fingerprint [N, dims]; R must be a multiple of `spec.size`."""

    mean: torch.Tensor
    projection: torch.Tensor

    def __init__(self, spec: FingerprintSpec, mean: torch.Tensor, projection: torch.Tensor) -> None:
        super().__init__()
        if mean.shape != (spec.raw_dims,) or projection.shape != (spec.raw_dims, spec.dims):
            raise ValueError(f"fingerprint: mean {tuple(mean.shape)} / projection {tuple(projection.shape)} do not "
                             f"fit {spec.raw_dims} raw dims -> {spec.dims}")
        self.spec = spec
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer("projection", projection.float(), persistent=False)

    def raw(self, image: torch.Tensor) -> torch.Tensor:
        return colour_layout(image, self.spec)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw descriptors -> unit fingerprints."""
        return F.normalize((raw - self.mean) @ self.projection, dim=-1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.raw(image))

    def combine(self, semantic: torch.Tensor, fingerprint: torch.Tensor) -> torch.Tensor:
        """The stored vector: unit semantic part and fingerprint, weighted so the whole is unit norm."""
        weight = self.spec.weight
        return torch.cat([semantic * (1 - weight) ** 0.5, fingerprint * weight ** 0.5], dim=-1)


def space_file(space: str) -> Path:
    """Where a space's fitted fingerprint lives (shipped with the training package)."""
    return Path(str(resources.files("training") / "spaces" / f"{space}.npz"))


def load_fingerprint(space: str) -> Fingerprint | None:
    """The fitted fingerprint of `space`, or None for a space without one."""
    path = space_file(space)
    if not path.exists():
        return None
    with np.load(path) as data:
        spec = FingerprintSpec(**json.loads(str(data["spec"])))
        return Fingerprint(spec, torch.from_numpy(data["mean"]), torch.from_numpy(data["projection"]))


def save_fingerprint(path: Path, spec: FingerprintSpec, mean: np.ndarray, projection: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, spec=json.dumps(asdict(spec)), mean=mean.astype(np.float32),
             projection=projection.astype(np.float32))


def discriminant(originals: np.ndarray, copies: list[np.ndarray], dims: int, ridge: float = 1e-3
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and projection [raw, dims]: directions where photos differ most relative to how their copies drift.

    Generalised eigenvectors of (between-photo covariance, copy-drift covariance), scaled so that every
    kept direction has unit variance across photos (unrelated photos then score near 0).
    """
    mean = originals.mean(axis=0)
    between = np.cov((originals - mean).T)
    drift = np.concatenate([c - originals for c in copies]
                           + [b - a for i, a in enumerate(copies) for b in copies[i + 1:]])
    within = drift.T @ drift / len(drift)
    within += ridge * np.trace(within) / len(within) * np.eye(len(within))
    inverse = np.linalg.inv(np.linalg.cholesky(within))  # whitens the drift: inverse @ within @ inverse.T = I
    values, vectors = np.linalg.eigh(inverse @ between @ inverse.T)
    order = np.argsort(values)[::-1][:dims]
    return mean, (inverse.T @ vectors[:, order]) / np.sqrt(values[order])


COPIES = 2
"""Near-duplicates made of each training photo to learn what re-compression changes."""


def fit_space(image_dir: Path, photos: list[str], out: Path, spec: FingerprintSpec = FingerprintSpec(),
              seed: int = 0, gallery_resolution: int = 240, query_resolution: int = 160) -> Path:
    """Fit the space's discriminant on `photos` (originals at the cloud's size, near-duplicates at the edge's)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from models.benchmark.transforms import near_duplicate
    from models.preprocess import Preprocess, load_image, preprocess

    def views(index: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, index])
        image = load_image(image_dir / photos[index])
        copies = [load_image(near_duplicate(image, rng)[0]) for _ in range(COPIES)]
        return ([preprocess(image, Preprocess(resize=gallery_resolution, crop=gallery_resolution))]
                + [preprocess(c, Preprocess(resize=query_resolution, crop=query_resolution)) for c in copies])

    rows: list[list[np.ndarray]] = [[] for _ in range(1 + COPIES)]
    with ThreadPoolExecutor(2) as pool, tqdm(total=len(photos), desc="fingerprint fit", unit="photo") as bar:
        for start in range(0, len(photos), 256):
            batch = list(pool.map(views, range(start, min(start + 256, len(photos)))))
            for v in range(1 + COPIES):
                rows[v].append(colour_layout(torch.from_numpy(np.stack([b[v] for b in batch])), spec).numpy())
            bar.update(len(batch))
    originals, *copies = (np.concatenate(r).astype(np.float64) for r in rows)
    mean, projection = discriminant(originals, copies, spec.dims)
    save_fingerprint(out, spec, mean, projection)
    return out
