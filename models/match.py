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

from models.manifest import Fingerprint, Space

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
    x = _fit(vectors, space)
    if match == "similar":
        return x
    semantic, fingerprint = parts(x, space)
    b = _fingerprint(space).duplicate_weight
    out = np.concatenate([np.sqrt(1 - b) * semantic, np.sqrt(b) * fingerprint], axis=1)
    return _unit(out).astype(np.float32).reshape(x.shape)  # unit already unless one part was zero


def parts(vectors: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray]:
    """The unit semantic parts [N, dim - k] and unit fingerprints [N, k] of rows of `space` (zero parts stay zero).

    What `query_vectors` re-weights, and what a report scores alone to show how much the pixels decide.
    """
    rows = np.atleast_2d(_fit(vectors, space))
    split = space.dim - _fingerprint(space).dims
    return _unit(rows[:, :split]), _unit(rows[:, split:])


def _fit(vectors: np.ndarray, space: Space) -> np.ndarray:
    """`vectors` as float32, refused unless shaped [N, dim] or [dim] of `space`."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != space.dim:
        raise ValueError(f"query vectors of shape {list(x.shape)} do not fit space {space.id!r}: expected "
                         f"[N, {space.dim}] or [{space.dim}]")
    return x


def _fingerprint(space: Space) -> Fingerprint:
    if space.fingerprint is None:
        raise ValueError(f"space {space.id!r} carries no photo fingerprint; duplicate matching needs a release "
                         f"whose space has one")
    return space.fingerprint


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; an all-zero row stays zero (no NaN)."""
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
