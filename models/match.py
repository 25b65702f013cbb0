"""How a query vector is matched: `similar` (what it shows) or `duplicate` (the same photo, edited or re-saved).

Every model of a space with a photo fingerprint writes `concat(sqrt(1-w) * s, sqrt(w) * f)`: `s` the unit
semantic part, `f` the unit pixel fingerprint, `w` the space's small fingerprint weight, so a plain (`similar`)
search is essentially semantic. A `duplicate` query re-weights only the QUERY to
`concat(sqrt(1-b) * s, sqrt(b) * f)` with b = `duplicate_weight`; against stored vectors the two parts then
count equally when sqrt((1-b)(1-w)) == sqrt(b*w). Stored gallery vectors are never touched.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from models.manifest import Space

Match = Literal["similar", "duplicate"]
MATCHES: tuple[str, ...] = get_args(Match)
"""The ways a query may match: `similar` (the default) and `duplicate`."""


def query_vectors(vectors: np.ndarray, space: Space, match: str) -> np.ndarray:
    """Query rows [N, dim] (or one row [dim]) ready to search `space` in `match`, as float32.

    `similar` returns them unchanged; `duplicate` re-weights semantic part and fingerprint (each L2-normalised
    first; a zero part stays zero and the row is scaled back to unit norm) so that a near-duplicate's
    fingerprint counts as much as what the photo shows.
    """
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; use one of {', '.join(MATCHES)}")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != space.dim:
        raise ValueError(f"query vectors of shape {list(x.shape)} do not fit space {space.id!r}: expected "
                         f"[N, {space.dim}] or [{space.dim}]")
    if match == "similar":
        return x
    fingerprint = space.fingerprint
    if fingerprint is None:
        raise ValueError(f"space {space.id!r} carries no photo fingerprint; duplicate matching needs a release "
                         f"whose space has one")
    rows = np.atleast_2d(x)
    split = space.dim - fingerprint.dims
    b = fingerprint.duplicate_weight
    out = np.concatenate([np.sqrt(1 - b) * _unit(rows[:, :split]), np.sqrt(b) * _unit(rows[:, split:])], axis=1)
    return _unit(out).astype(np.float32).reshape(x.shape)  # unit already unless one part was zero


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; an all-zero row stays zero (no NaN)."""
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
