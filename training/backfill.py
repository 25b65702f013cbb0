"""Fit the backfill order a new cloud model ships with (FastFill's idea, Jaeckle et al. ICLR 2023, kept linear).

A backfill re-encodes stored photos with the new model. Photos whose old vector sits far from where the new
model puts them hurt retrieval most, so they should go first; but the new vector is only known after the work.
`fit_scorer` learns, on training photos both models encoded, a ridge regression from an old vector alone to
that distance `1 - cos(old, new)`; the server orders a backfill by it (`models.manifest.BackfillScorer`).
"""

from __future__ import annotations

import numpy as np

from models.manifest import BackfillScorer

RIDGE = 1.0


def fit_scorer(old: np.ndarray, new: np.ndarray, ridge: float = RIDGE) -> tuple[BackfillScorer, float]:
    """The scorer predicting `1 - cos(old_i, new_i)` from `old_i` (rows: the same photos, unit vectors), and
    the Spearman correlation of its scores with the true distances on those photos (how well it orders)."""
    old64, new64 = old.astype(np.float64), new.astype(np.float64)
    target = 1.0 - np.sum(old64 * new64, axis=1)
    mean_x, mean_y = old64.mean(axis=0), target.mean()
    x = old64 - mean_x
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ (target - mean_y))
    scorer = BackfillScorer(tuple(float(w) for w in weights), float(mean_y - mean_x @ weights))
    return scorer, spearman(scorer.score(old.astype(np.float32)), target)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
