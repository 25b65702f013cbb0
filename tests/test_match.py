"""`query_vectors`: similar leaves a query as it is; duplicate re-weights semantic part and fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from models.manifest import Fingerprint, Space
from models.match import MATCHES, parts, query_vectors

SEMANTIC, PRINT = 24, 8
W, B = 0.02, 0.98
SPACE = Space("fp", SEMANTIC + PRINT, fingerprint=Fingerprint(PRINT, W, B))
PLAIN = Space("concord", SEMANTIC + PRINT)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def stored(semantic: np.ndarray, fingerprint: np.ndarray, w: float = W) -> np.ndarray:
    """A vector as a model of the space writes it: concat(sqrt(1-w) s, sqrt(w) f), both parts unit."""
    return np.concatenate([np.sqrt(1 - w) * unit(semantic), np.sqrt(w) * unit(fingerprint)], axis=-1)


def test_similar_is_the_identity() -> None:
    x = unit(np.random.default_rng(0).standard_normal((5, SPACE.dim))).astype(np.float64)
    out = query_vectors(x, SPACE, "similar")
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    assert np.array_equal(query_vectors(x, PLAIN, "similar"), x.astype(np.float32))  # no fingerprint needed
    assert MATCHES == ("similar", "duplicate")


def test_duplicate_rows_are_unit_with_the_duplicate_weights() -> None:
    rng = np.random.default_rng(1)
    x = stored(rng.standard_normal((6, SEMANTIC)), rng.standard_normal((6, PRINT)))
    out = query_vectors(x, SPACE, "duplicate")
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[:, SEMANTIC:], axis=1), np.sqrt(B), atol=1e-6)
    # each part keeps its direction
    np.testing.assert_allclose(unit(out[:, :SEMANTIC]), unit(x[:, :SEMANTIC]), atol=1e-6)
    np.testing.assert_allclose(unit(out[:, SEMANTIC:]), unit(x[:, SEMANTIC:]), atol=1e-6)
    one = query_vectors(x[0], SPACE, "duplicate")
    assert one.shape == (SPACE.dim,) and np.allclose(one, out[0], atol=1e-7)


def test_against_stored_vectors_semantic_and_fingerprint_count_equally() -> None:
    """sqrt((1-b)(1-w)) == sqrt(b w): the query's semantic and fingerprint cosines weigh the same."""
    rng = np.random.default_rng(2)
    q_sem, q_fp = unit(rng.standard_normal(SEMANTIC)), unit(rng.standard_normal(PRINT))
    query = query_vectors(stored(q_sem, q_fp), SPACE, "duplicate")
    g_sem, g_fp = unit(rng.standard_normal(SEMANTIC)), unit(rng.standard_normal(PRINT))
    score = float(query @ stored(g_sem, g_fp))
    weight = np.sqrt(B * W)
    assert score == pytest.approx(weight * (float(q_sem @ g_sem) + float(q_fp @ g_fp)), abs=1e-6)


def test_the_same_photo_beats_a_semantically_closer_one_in_duplicate_only() -> None:
    """The original (its fingerprint equal to the query's) wins over a photo whose semantic part is closer by a
    margin smaller than the fingerprint gap; a similar search ranks them the other way."""
    rng = np.random.default_rng(3)
    q_sem, q_fp = unit(rng.standard_normal(SEMANTIC)), unit(rng.standard_normal(PRINT))
    other_fp = unit(q_fp + 1.5 * unit(rng.standard_normal(PRINT)))
    fingerprint_gap = 1.0 - float(q_fp @ other_fp)
    margin = fingerprint_gap / 2
    original_sem = unit(q_sem + 0.8 * unit(rng.standard_normal(SEMANTIC)))
    cos_original = float(q_sem @ original_sem)
    # a semantic part whose cosine to the query is cos_original + margin (still < 1)
    assert cos_original + margin < 1
    perp = unit(original_sem - cos_original * q_sem)
    target = cos_original + margin
    closer_sem = target * q_sem + np.sqrt(1 - target ** 2) * perp
    original, closer = stored(original_sem, q_fp), stored(closer_sem, other_fp)
    gallery = np.stack([original, closer])
    query = stored(q_sem, q_fp)
    duplicate = query_vectors(query, SPACE, "duplicate") @ gallery.T
    similar = query_vectors(query, SPACE, "similar") @ gallery.T
    assert duplicate[0] > duplicate[1]
    assert similar[1] > similar[0]


def test_a_zero_part_stays_zero_without_nan() -> None:
    x = np.zeros((2, SPACE.dim), dtype=np.float32)
    x[0, :SEMANTIC] = unit(np.arange(1, SEMANTIC + 1, dtype=np.float32))  # no fingerprint at all
    out = query_vectors(x, SPACE, "duplicate")
    assert np.all(np.isfinite(out))
    assert np.all(out[0, SEMANTIC:] == 0) and np.linalg.norm(out[0]) == pytest.approx(1.0, abs=1e-6)
    assert np.all(out[1] == 0)


def test_errors_name_the_problem() -> None:
    x = np.zeros((1, SPACE.dim), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown match 'exact'; use one of similar, duplicate"):
        query_vectors(x, SPACE, "exact")
    with pytest.raises(ValueError, match="space 'concord' carries no photo fingerprint; duplicate matching needs "
                                         "a release whose space has one"):
        query_vectors(x, PLAIN, "duplicate")
    with pytest.raises(ValueError, match=r"shape \[1, 31\] do not fit space 'fp': expected \[N, 32\]"):
        query_vectors(np.zeros((1, 31)), SPACE, "similar")
    with pytest.raises(ValueError, match="do not fit"):
        query_vectors(np.zeros((2, 2, SPACE.dim)), SPACE, "duplicate")


def test_parts_are_the_unit_semantic_part_and_fingerprint() -> None:
    rng = np.random.default_rng(4)
    sem, fp = rng.standard_normal((3, SEMANTIC)), rng.standard_normal((3, PRINT))
    semantic, fingerprint = parts(stored(sem, fp), SPACE)
    np.testing.assert_allclose(semantic, unit(sem), atol=1e-6)
    np.testing.assert_allclose(fingerprint, unit(fp), atol=1e-6)
    with pytest.raises(ValueError, match="carries no photo fingerprint"):
        parts(stored(sem, fp), PLAIN)
