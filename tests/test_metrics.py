"""Retrieval metrics against hand-built rankings with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.benchmark.metrics import (
    average_precision,
    average_precisions,
    ecc,
    evaluate_retrieval,
    flip_rates,
    hits_at_1,
    is_relevant,
    mean_average_precision,
    mixed_gallery,
    rank,
    ranked_relevance,
    recall_at_k,
    retrieval_result,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


def test_rank_orders_by_inner_product_with_and_without_k() -> None:
    gallery = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]))
    queries = unit(np.array([[1.0, 0.1], [0.0, 1.0]]))
    assert rank(queries, gallery).tolist() == [[0, 2, 1, 3], [1, 2, 3, 0]]
    assert rank(queries, gallery, k=2).tolist() == [[0, 2], [1, 2]]
    assert rank(queries, gallery, k=10).shape == (2, 4)


def test_faiss_top_k_agrees_with_full_ranking() -> None:
    queries, gallery = random_unit(20, 16, 0), random_unit(50, 16, 1)
    np.testing.assert_array_equal(rank(queries, gallery, k=5), rank(queries, gallery)[:, :5])


def test_rank_refuses_mismatched_dims_and_bad_k() -> None:
    with pytest.raises(ValueError, match="dim"):
        rank(random_unit(2, 4, 0), random_unit(3, 5, 0))
    with pytest.raises(ValueError, match="k must be"):
        rank(random_unit(2, 4, 0), random_unit(3, 4, 0), k=0)


def test_distractors_are_never_relevant() -> None:
    ranked = np.array([[0, 1, 2], [2, 1, 0]])
    gallery_labels = np.array([3, -1, 5])
    relevant = is_relevant(ranked, np.array([3, -1]), gallery_labels)
    assert relevant.tolist() == [[True, False, False], [False, False, False]]


def test_recall_at_k_on_hand_built_relevance() -> None:
    rel = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)
    assert recall_at_k(rel, 1) == pytest.approx(1 / 4)
    assert recall_at_k(rel, 2) == pytest.approx(2 / 4)
    assert recall_at_k(rel, 3) == pytest.approx(3 / 4)
    assert hits_at_1(rel).tolist() == [False, True, False, False]


def test_average_precision_known_values() -> None:
    assert average_precision(np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0, 1, 0, 1])) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(np.array([1, 1, 0])) == pytest.approx(1.0)
    assert math.isnan(average_precision(np.array([0, 0, 0])))


def test_map_excludes_queries_without_relevant_photos() -> None:
    rel = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=bool)
    assert mean_average_precision(rel) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert math.isnan(mean_average_precision(np.zeros((2, 3), dtype=bool)))


def test_average_precisions_match_a_loop_over_ranks() -> None:
    rel = np.random.default_rng(3).random((30, 40)) < 0.15

    def loop(row: np.ndarray) -> float:
        found, total = 0, 0.0
        for position, hit in enumerate(row, start=1):
            if hit:
                found += 1
                total += found / position
        return total / found if found else float("nan")

    np.testing.assert_allclose(average_precisions(rel), [loop(r) for r in rel], equal_nan=True)


def test_ranked_relevance_equals_the_stable_full_ranking_even_with_ties() -> None:
    # small integer vectors: every inner product is exact in float32 (no rounding that depends on the
    # BLAS kernel of a chunk shape), and many are tied across photos of different labels
    rng = np.random.default_rng(5)
    gallery = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)
    g_labels = rng.integers(-1, 5, size=40)
    q_labels = np.arange(23) % 6  # label 5 has no gallery photo
    expected = is_relevant(rank(queries, gallery), q_labels, g_labels)
    for chunk in (4, 1024):
        np.testing.assert_array_equal(ranked_relevance(queries, gallery, q_labels, g_labels, chunk), expected)
    counts = ((g_labels[None, :] == q_labels[:, None]) & (g_labels[None, :] != -1)).sum(axis=1)
    np.testing.assert_array_equal(expected.sum(axis=1), counts)


def test_flip_rates_values_and_identity() -> None:
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert flip_rates(a, b) == pytest.approx((2 / 5, 1 / 5))
    assert flip_rates(b, a) == pytest.approx((1 / 5, 2 / 5))
    with pytest.raises(ValueError, match="shapes"):
        flip_rates(a, b[:3])


def test_recall_change_equals_pfr_minus_nfr_on_real_searches() -> None:
    gallery, labels = random_unit(60, 8, 6), np.arange(60) % 6
    q_labels = np.arange(40) % 6
    old = q_labels < 3
    a = evaluate_retrieval(random_unit(40, 8, 7), gallery, q_labels, labels, old)
    b = evaluate_retrieval(random_unit(40, 8, 8), gallery, q_labels, labels, old)
    nfr, pfr = flip_rates(a.hits_at_1, b.hits_at_1)
    assert nfr > 0 and pfr > 0
    assert b.overall.recall_at_1 - a.overall.recall_at_1 == pytest.approx(pfr - nfr)


def test_ecc_is_strict() -> None:
    assert ecc(0.51, 0.5)
    assert not ecc(0.5, 0.5)
    assert not ecc(0.49, 0.5)
    assert not ecc(float("nan"), 0.5)


def test_mixed_gallery_shares() -> None:
    old, new = random_unit(40, 6, 9), random_unit(40, 6, 10)
    np.testing.assert_array_equal(mixed_gallery(old, new, 0.0), old)
    np.testing.assert_array_equal(mixed_gallery(old, new, 1.0), new)
    half = mixed_gallery(old, new, 0.5, seed=3)
    from_new = (half == new).all(axis=1)
    assert from_new.sum() == 20 and ((half == old).all(axis=1) == ~from_new).all()
    quarter = (mixed_gallery(old, new, 0.25, seed=3) == new).all(axis=1)
    assert quarter.sum() == 10 and (from_new[quarter]).all()
    with pytest.raises(ValueError, match="share"):
        mixed_gallery(old, new, 1.5)


def test_retrieval_result_splits_old_and_new_queries() -> None:
    rel = np.array([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=bool)
    old = np.array([True, True, False, False])
    result = retrieval_result(rel, old)
    assert result.overall.recall_at_1 == pytest.approx(0.5)
    assert result.old.recall_at_1 == pytest.approx(0.5) and result.old.queries == 2
    assert result.new.recall_at_1 == pytest.approx(0.5) and result.new.map == pytest.approx(1.0)
    assert result.old.map == pytest.approx((1 + 1 / 2) / 2)
    empty = retrieval_result(rel, np.ones(4, dtype=bool)).new
    assert empty.queries == 0 and empty.to_dict()["recall@1"] is None
    with pytest.raises(ValueError, match="mask"):
        retrieval_result(rel, old[:3])
