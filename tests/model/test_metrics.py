"""Metrics against hand-made cases and, for AUC, a brute-force count over all pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import (
    accuracy,
    mean_reciprocal_rank,
    pair_score_shares,
    rank_of_positive,
    recall_at_k,
    roc_auc,
)


def test_rank_of_positive_hand_cases():
    scores = np.array(
        [
            [0.9, 0.5, 0.1],  # positive second
            [0.2, 0.9, 0.1],  # positive first
            [0.1, 0.9, 0.8],  # two positives: the better one (0.8) counts
            [0.3, 0.2, 0.1],  # positive last
        ]
    )
    positive = np.array(
        [
            [False, True, False],
            [False, True, False],
            [True, False, True],
            [False, False, True],
        ]
    )
    np.testing.assert_array_equal(rank_of_positive(scores, positive), [2, 1, 2, 3])


def test_rank_of_positive_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.7, 0.7, 0.1]])
    positive = np.array(
        [
            [False, True, False],  # tied with one wrong candidate: ranks below it
            [True, True, False],  # two correct tied with one wrong: the wrong one still goes first
            [True, False, False],  # a constant scorer earns the worst rank
            [True, True, False],  # correct candidates tied only with each other: rank 1
        ]
    )
    np.testing.assert_array_equal(rank_of_positive(scores, positive), [2, 2, 3, 1])


def test_rank_of_positive_needs_a_correct_candidate():
    with pytest.raises(AssertionError):
        rank_of_positive(np.zeros((1, 3)), np.zeros((1, 3), dtype=bool))


def test_recall_at_k_in_percent():
    ranks = np.array([1, 2, 6, 11])
    assert recall_at_k(ranks) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    assert recall_at_k(ranks, ks=(100,)) == {"R@100": 100.0}


def test_mean_reciprocal_rank():
    assert mean_reciprocal_rank(np.array([1, 2, 4])) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mean_reciprocal_rank(np.array([1, 1])) == 1.0


def test_roc_auc_extremes_and_ties():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.zeros(4), labels) == 0.5


def test_roc_auc_hand_computed():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats one of two, 0.8 beats both -> 3/4.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # Positive 1 ties negative 1 (half) and loses to negative 2 -> 0.5 / 2.
    assert roc_auc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 0])) == pytest.approx(0.25)


def test_roc_auc_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # coarse scores: many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_one_class_is_nan():
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_accuracy_with_threshold():
    scores = np.array([1.0, -1.0, 0.5, -2.0])
    labels = np.array([True, False, False, True])
    assert accuracy(scores, labels) == 50.0
    assert accuracy(scores, labels, threshold=0.7) == 75.0


def test_pair_score_shares_separate_priors_from_matching():
    text_prior, image_prior = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0, 3.0, 0.0]])
    additive = pair_score_shares(text_prior + image_prior)  # no pair is special: no interaction
    assert additive["interaction"] == pytest.approx(0.0, abs=1e-12)
    # Text effects -1, 0, 1 over 3 images: 6; image effects -1, 2, -1 over 3 texts: 18.
    assert additive["text"] == pytest.approx(6 / 24)
    assert additive["image"] == pytest.approx(18 / 24)
    matching = pair_score_shares(np.eye(4))  # only the true pairs score: every row and column alike
    assert matching["text"] == pytest.approx(0.0, abs=1e-12)
    assert matching["image"] == pytest.approx(0.0, abs=1e-12)
    assert matching["interaction"] == pytest.approx(1.0)
    mixed = pair_score_shares(np.eye(3) + text_prior)  # text effects -1, 0, 1: 6; interaction 2 (of 8)
    assert mixed == pytest.approx({"text": 6 / 8, "image": 0.0, "interaction": 2 / 8})
