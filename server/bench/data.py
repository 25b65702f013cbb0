"""Benchmark vectors: a Gaussian mixture shaped like real embeddings, L2-normalised.

The mixture is fitted to real embeddings when there are some (k-means centres, their mixture weights,
the pooled within-cluster covariance and each cluster's own spread), else its centres come from a fixed
seed and its spread is isotropic; `Mixture.source` says which. Galleries and queries are independent draws
(different seeds) from the same mixture, so every query is held out from every gallery.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_EMBEDDINGS = Path("reports/benchmark/embeddings/cloud-v2.npz")
"""The benchmark's gallery embeddings by the newest cloud model (written by `concord benchmark`)."""
SYNTHETIC_SIGMA = 0.06
"""Per-dimension std of the seeded fallback: at 256-d a point's cosine to its centre is about 0.72."""
CHUNK = 65_536


class EmbeddingSourceError(ValueError):
    """Real embeddings that cannot be used (unreadable, not 2-D, wrong dim, too few)."""


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture on the unit sphere: x = normalise(centre_c + scale_c * z @ spread.T), c ~ weights."""

    centres: np.ndarray
    weights: np.ndarray
    scales: np.ndarray
    spread: np.ndarray
    source: str
    """How the mixture was made, in words, for the report."""
    fidelity: dict[str, float] | None = None
    """Fitted mixtures: the median nearest-neighbour cosine of the real set and of a draw of the same size."""

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])

    def sample(self, count: int, seed: int) -> np.ndarray:
        """`count` unit vectors float32 [count, dim], drawn in chunks to keep memory at the output's size."""
        rng = np.random.default_rng(seed)
        out = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            comp = rng.choice(len(self.weights), size=n, p=self.weights)
            noise = rng.standard_normal((n, self.dim), dtype=np.float32) @ self.spread.T
            x = self.centres[comp] + self.scales[comp, None] * noise
            out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def describe(self) -> dict[str, Any]:
        """The facts a report needs to say exactly how its vectors were made."""
        variance = float(np.trace(self.spread @ self.spread.T))
        return {"source": self.source, "components": len(self.weights), "dim": self.dim,
                "within_cluster_total_variance": variance,
                "scale_min_median_max": [float(np.min(self.scales)), float(np.median(self.scales)),
                                         float(np.max(self.scales))],
                "centre_norm_median": float(np.median(np.linalg.norm(self.centres, axis=1))),
                "normalised": "every drawn vector is L2-normalised", "fidelity": self.fidelity}


def seeded_mixture(dim: int, components: int, seed: int, sigma: float = SYNTHETIC_SIGMA) -> Mixture:
    """Centres: random unit vectors from `seed`; spread: isotropic `sigma`, each cluster scaled by U(0.8, 1.2)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(components, 5.0))
    scales = rng.uniform(0.8, 1.2, components).astype(np.float32)
    spread = (sigma * np.eye(dim)).astype(np.float32)
    source = (f"no real embeddings: {components} centres drawn as random unit vectors (seed {seed}), weights "
              f"Dirichlet(5), isotropic per-dimension std {sigma} times a per-cluster factor U(0.8, 1.2)")
    return Mixture(centres, weights, scales, spread, source)


def fitted_mixture(embeddings: np.ndarray, components: int, seed: int, origin: str) -> Mixture:
    """Fit the mixture to real embeddings: k-means centres, cluster shares, pooled covariance, per-cluster scale."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = max(1, min(components, len(x) // 10))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=False, verbose=False)
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    assign = assign[:, 0]
    centres = np.stack([x[assign == c].mean(axis=0) if np.any(assign == c) else np.asarray(kmeans.centroids)[c]
                        for c in range(k)]).astype(np.float32)
    residual = x - centres[assign]
    pooled = residual.T @ residual / max(1, len(x) - k)
    spread = np.linalg.cholesky(pooled + 1e-6 * np.eye(x.shape[1])).astype(np.float32)
    total = float(np.trace(pooled))
    scales = np.ones(k, dtype=np.float32)
    for c in range(k):
        members = residual[assign == c]
        if len(members) > 1:
            scales[c] = np.sqrt(np.mean(np.sum(members ** 2, axis=1)) / total)
    weights = np.bincount(assign, minlength=k).astype(np.float64)
    weights = np.maximum(weights, 1) / np.maximum(weights, 1).sum()
    source = (f"fitted to {len(x)} real {x.shape[1]}-d embeddings from {origin}: {k} k-means centres (seed {seed}) "
              f"with their cluster shares as weights, noise from the pooled within-cluster covariance (Cholesky "
              f"factor) scaled per cluster by its own RMS spread")
    mixture = Mixture(centres, weights.astype(np.float64), scales, spread, source)
    drawn = mixture.sample(len(x), seed + 7)
    fidelity = {"real_median_nn_cosine": median_nn_cosine(x), "synthetic_median_nn_cosine": median_nn_cosine(drawn),
                "compared_vectors": float(len(x))}
    return Mixture(centres, mixture.weights, scales, spread, source, fidelity)


def median_nn_cosine(x: np.ndarray, probes: int = 1000) -> float:
    """Median cosine of (up to) `probes` evenly spread vectors to their nearest other vector of the set."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    rows = np.linspace(0, len(x) - 1, min(probes, len(x))).astype(np.int64)
    scores, _ = index.search(np.ascontiguousarray(x[rows], dtype=np.float32), 2)
    return float(np.median(scores[:, 1]))


def load_embeddings(source: str | Path) -> tuple[np.ndarray, str]:
    """Real embeddings from a .npy/.npz file or a folder of them: 2-D float arrays, stacked.

    From an .npz holding a `gallery` array only that array is used (the benchmark writes `gallery` and
    `queries` per model); arrays of another dim than the commonest are left out.
    """
    source = Path(source)
    files = sorted(p for p in source.rglob("*") if p.suffix in (".npy", ".npz")) if source.is_dir() else [source]
    arrays: list[np.ndarray] = []
    for path in files:
        try:
            if path.suffix == ".npz":
                with np.load(path) as data:
                    names = ["gallery"] if "gallery" in data.files else data.files
                    arrays += [np.asarray(data[name]) for name in names]
            else:
                arrays.append(np.load(path))
        except (OSError, ValueError) as err:
            raise EmbeddingSourceError(f"{path}: cannot read embeddings ({err})") from None
    usable = [a for a in arrays if a.ndim == 2 and a.dtype.kind == "f" and len(a) > 0]
    if not usable:
        raise EmbeddingSourceError(f"{source}: no 2-D float arrays of embeddings in {len(files)} file(s)")
    dims = [a.shape[1] for a in usable]
    dim = max(set(dims), key=dims.count)
    stacked = np.concatenate([a for a in usable if a.shape[1] == dim]).astype(np.float32)
    return stacked, str(source)


def mixture_for(dim: int, components: int, seed: int, embeddings: str | Path | None) -> Mixture:
    """The benchmark's mixture: fitted to `embeddings` when that path exists, else the seeded fallback."""
    if embeddings is None or not Path(embeddings).exists():
        mixture = seeded_mixture(dim, components, seed)
        where = f" ({embeddings} does not exist)" if embeddings is not None else ""
        return replace(mixture, source=mixture.source + where)
    x, origin = load_embeddings(embeddings)
    if x.shape[1] != dim:
        raise EmbeddingSourceError(f"{origin}: embeddings are {x.shape[1]}-d, the benchmark asks for {dim}-d")
    if len(x) < 2 * dim:
        raise EmbeddingSourceError(f"{origin}: {len(x)} embeddings are too few to measure a {dim}-d spread")
    return fitted_mixture(x, components, seed, origin)


def neighbour_stats(scores: np.ndarray) -> dict[str, float]:
    """Median cosine of the queries to their 1st and k-th exact neighbour: how crowded the space is."""
    return {"median_top1_cosine": float(np.median(scores[:, 0])),
            "median_top10_cosine": float(np.median(scores[:, -1]))}
