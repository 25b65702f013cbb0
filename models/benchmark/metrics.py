"""Retrieval metrics of the benchmark, torch-free (numpy + faiss) so the server's benchmark tools reuse them.

Conventions (DESIGN.md, metric definitions):
- vectors are L2-normalised float32; similarity is the inner product;
- a gallery photo is relevant to a query when it has the query's class label; label -1 marks a
  distractor, never relevant to any query;
- Recall@k counts every query: a query with no relevant photo in the gallery is a miss. This keeps
  Recall@1 = mean(hits@1), so that the change in Recall@1 between two models equals PFR - NFR;
- average precision is taken over the whole ranked gallery; a query with no relevant photo in the
  gallery has no AP (NaN) and is excluded from mAP;
- an empty query subset has NaN for every figure;
- leave-one-out (`exclude_self`, the open-world protocol): query i and gallery photo i are the same photo
  (possibly encoded by two models); that photo is ranked last for its own query and is never relevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

DISTRACTOR = -1
"""Gallery label of photos that belong to no class: never relevant."""
CHUNK = 1024
"""Queries ranked at once by the full ranking (bounds memory to CHUNK x gallery)."""


def _vectors(x: np.ndarray, name: str) -> np.ndarray:
    """`x` as a C-contiguous float32 [N, d] matrix, or a ValueError naming `name`."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, d] matrix, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _pair(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and gallery as float32 matrices of one dimension."""
    q, g = _vectors(queries, "queries"), _vectors(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but the gallery has dim {g.shape[1]}")
    return q, g


def rank(queries: np.ndarray, gallery: np.ndarray, k: int | None = None) -> np.ndarray:
    """Gallery indices [Nq, k] by decreasing inner product (FAISS flat IP); all Ng of them when k is None."""
    q, g = _pair(queries, gallery)
    if k is None:
        return np.argsort(-(q @ g.T), axis=1, kind="stable")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    _, ids = index.search(q, min(k, g.shape[0]))
    return ids.astype(np.int64)


def is_relevant(ranked: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Boolean [Nq, K]: is the gallery photo at each rank of the query's class (distractors never are)."""
    if ranked.shape[0] != len(query_labels):
        raise ValueError(f"{ranked.shape[0]} ranked rows but {len(query_labels)} query labels")
    labels = np.asarray(gallery_labels)[ranked]
    return (labels == np.asarray(query_labels)[:, None]) & (labels != DISTRACTOR)


def ranked_relevance(queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray,
                     gallery_labels: np.ndarray, chunk: int = CHUNK, exclude_self: bool = False) -> np.ndarray:
    """Relevance [Nq, Ng] of the full ranking of the gallery for every query, as `is_relevant(rank(...))`.
    With `exclude_self`, query i's own photo (gallery photo i) is ranked last and never relevant.

    The same order as the stable argsort of `rank`, but it sorts only the similarity values and places
    each relevant photo by counting the photos ranked before it (about 4x faster on the benchmark's
    gallery). Similarities of one pair may differ by an ulp between BLAS calls of other shapes, so
    near-exact ties can order differently from `rank` on the whole query set.
    """
    q, g = _pair(queries, gallery)
    q_labels, g_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(g_labels) != len(g):
        raise ValueError(f"{len(g)} gallery vectors but {len(g_labels)} gallery labels")
    if len(q_labels) != len(q):
        raise ValueError(f"{len(q)} query vectors but {len(q_labels)} query labels")
    if exclude_self and len(q) != len(g):
        raise ValueError(f"leave-one-out needs one query per gallery photo: {len(q)} queries, {len(g)} photos")
    members = {int(c): np.flatnonzero(g_labels == c) for c in np.unique(q_labels) if c != DISTRACTOR}
    out = np.zeros((len(q), len(g)), dtype=bool)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ g.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
        descending = np.sort(-sims, axis=1)
        for row, label in enumerate(q_labels[start:start + chunk]):
            relevant = members.get(int(label), np.zeros(0, dtype=np.int64))
            if exclude_self:
                relevant = relevant[relevant != start + row]
            out[start + row, _positions(sims[row], descending[row], relevant)] = True
    return out


def _positions(sims: np.ndarray, descending: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Ranks of gallery `items` in the stable descending order of `sims` (`descending` = np.sort(-sims)):
    the photos more similar, plus the equally similar ones of lower index."""
    before = np.searchsorted(descending, -sims[items], side="left")
    tied = np.searchsorted(descending, -sims[items], side="right") - before > 1
    for k in np.flatnonzero(tied):
        before[k] += np.count_nonzero(sims[: items[k]] == sims[items[k]])
    return before


def hits_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Boolean [Nq]: does the query have a relevant photo among its k nearest."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = np.asarray(relevance, dtype=bool)
    return np.any(rel[:, :k], axis=1)


def hits_at_1(relevance: np.ndarray) -> np.ndarray:
    """Boolean [Nq]: is the nearest gallery photo relevant (the per-query outcome NFR/PFR compare)."""
    return hits_at_k(relevance, 1)


def _mean(values: np.ndarray) -> float:
    """Mean of `values`, NaN when there are none."""
    return float(np.mean(values)) if len(values) else float("nan")


def recall_at_k(relevance: np.ndarray, k: int) -> float:
    """Recall@k (CMC top-k): share of queries with a relevant photo among their k nearest."""
    return _mean(hits_at_k(relevance, k))


def average_precisions(relevance: np.ndarray) -> np.ndarray:
    """AP [Nq] of each ranked row over the whole row: mean over relevant ranks r_i of i / r_i; NaN if none."""
    rel = np.asarray(relevance, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be 2-D [Nq, K], got shape {rel.shape}")
    rows, cols = np.nonzero(rel)
    counts = rel.sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    nth = np.arange(len(rows)) - starts[rows] + 1
    sums = np.bincount(rows, weights=nth / (cols + 1), minlength=len(rel))
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def average_precision(relevance: np.ndarray) -> float:
    """AP of one ranked relevance vector (e.g. [1, 0, 1] -> (1 + 2/3) / 2); NaN when nothing is relevant."""
    return float(average_precisions(np.asarray(relevance, dtype=bool)[None, :])[0])


def mean_average_precision(relevance: np.ndarray) -> float:
    """mAP: mean AP over the queries that have a relevant photo (the others are excluded); NaN if none has."""
    ap = average_precisions(relevance)
    return _mean(ap[~np.isnan(ap)])


def flip_rates(hits_a: np.ndarray, hits_b: np.ndarray) -> tuple[float, float]:
    """(NFR, PFR) of moving from a to b: share of queries hit under a and missed under b, and the reverse."""
    a, b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"hits of different shapes: {a.shape} and {b.shape}")
    return _mean(a & ~b), _mean(~a & b)


def ecc(new_metric: float, replaced_metric: float) -> bool:
    """Empirical compatibility criterion: the new model's figure is strictly greater (NaN never passes)."""
    return bool(new_metric > replaced_metric)


def mixed_take(size: int, share: float, seed: int = 0) -> np.ndarray:
    """The photos (indices) a mixed gallery of `size` takes from the new model: round(share * size) of them."""
    return np.random.default_rng(seed).permutation(size)[: round(share * size)]


def mixed_gallery(old: np.ndarray, new: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """One gallery whose photos are a share `share` encoded by the new model, the rest by the old one.

    The photos taken from `new` are the first round(share * N) of one seeded permutation, so the
    selections of larger shares contain those of smaller ones.
    """
    o, n = _pair(old, new)
    if o.shape != n.shape:
        raise ValueError(f"old and new galleries differ in shape: {o.shape} and {n.shape}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1], got {share}")
    take = mixed_take(len(o), share, seed)
    mixed = o.copy()
    mixed[take] = n[take]
    return mixed


@dataclass(frozen=True)
class Scores:
    """Recall@1, Recall@5 and mAP of one query subset (`queries` = its size; NaN figures when empty)."""

    recall_at_1: float
    recall_at_5: float
    map: float
    queries: int

    @classmethod
    def of(cls, relevance: np.ndarray) -> Scores:
        return cls(recall_at_k(relevance, 1), recall_at_k(relevance, 5), mean_average_precision(relevance),
                   len(relevance))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN as None), keyed like the manifest's matrix: recall@1, recall@5, map."""
        return {"recall@1": _json_float(self.recall_at_1), "recall@5": _json_float(self.recall_at_5),
                "map": _json_float(self.map), "queries": self.queries}


@dataclass(frozen=True)
class RetrievalResult:
    """Figures of one (query model, gallery) search: overall, old-class and new-class queries, and the
    per-query hits@1 over all queries (for NFR/PFR)."""

    overall: Scores
    old: Scores
    new: Scores
    hits_at_1: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures of the three subsets (the per-query hits are left out)."""
        return {"overall": self.overall.to_dict(), "old": self.old.to_dict(), "new": self.new.to_dict()}


def retrieval_result(relevance: np.ndarray, old_mask: np.ndarray) -> RetrievalResult:
    """RetrievalResult of a full-gallery relevance matrix; `old_mask` marks the old-class queries."""
    rel, old = np.asarray(relevance, dtype=bool), np.asarray(old_mask, dtype=bool)
    if old.shape != (len(rel),):
        raise ValueError(f"old-class mask has shape {old.shape}, expected ({len(rel)},)")
    return RetrievalResult(Scores.of(rel), Scores.of(rel[old]), Scores.of(rel[~old]), hits_at_1(rel))


def evaluate_retrieval(queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray,
                       gallery_labels: np.ndarray, old_mask: np.ndarray, exclude_self: bool = False) -> RetrievalResult:
    """Rank the whole gallery for every query and measure it (overall / old / new classes); `exclude_self`: each
    query's own photo is left out (leave-one-out, the gallery being the queries' photos)."""
    relevance = ranked_relevance(queries, gallery, query_labels, gallery_labels, exclude_self=exclude_self)
    return retrieval_result(relevance, old_mask)


def _json_float(value: float) -> float | None:
    """A float for JSON: NaN becomes None."""
    return None if np.isnan(value) else float(value)
