"""Retrieval and alignment metrics in plain numpy: ranks, Recall@K, MRR, ROC AUC, accuracy.

Ties are resolved against the model (a correct candidate tied with a wrong one ranks below it), so a
constant scorer earns no credit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rank_of_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """1-based rank of each row's best correct candidate in a (Q, C) score matrix: (Q,) int64.

    `positive` is a (Q, C) boolean mask of the correct candidates; every row needs at least one.
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    assert scores.ndim == 2, f"scores must be (Q, C), got shape {scores.shape}"
    assert scores.shape == positive.shape, f"scores {scores.shape} and mask {positive.shape} differ"
    assert positive.any(axis=1).all(), "every query needs at least one correct candidate"
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    # Pessimistic ties: every wrong candidate scoring at least as high ranks above.
    return 1 + ((scores >= best) & ~positive).sum(axis=1).astype(np.int64)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Percent of queries whose correct candidate ranks within the top K: {"R@1": 23.9, ...}."""
    ranks = np.asarray(ranks)
    assert ranks.size > 0, "recall of no queries is undefined"
    return {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean of 1 / rank, in [0, 1]: rewards near misses that Recall@K ignores."""
    ranks = np.asarray(ranks, dtype=np.float64)
    assert ranks.size > 0, "MRR of no queries is undefined"
    assert (ranks >= 1).all(), "ranks are 1-based"
    return float(np.mean(1.0 / ranks))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative, ties counted half (Mann-Whitney U).

    NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    assert scores.shape == labels.shape, f"{scores.shape[0]} scores but {labels.shape[0]} labels"
    num_positive = int(labels.sum())
    num_negative = labels.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    # Average 1-based ranks of tied scores, so a tie between classes contributes exactly half.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each distinct score
    average_rank = last - (counts - 1) / 2.0
    positive_rank_sum = average_rank[inverse][labels].sum()
    u = positive_rank_sum - num_positive * (num_positive + 1) / 2.0
    return float(u / (num_positive * num_negative))


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> float:
    """Percent of pairs classified right by `score > threshold` (threshold 0 on alignment logits)."""
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    assert scores.shape == labels.shape, f"{scores.shape[0]} scores but {labels.shape[0]} labels"
    assert scores.size > 0, "accuracy of no pairs is undefined"
    return float(100.0 * np.mean((scores > threshold) == labels))


def pair_score_shares(scores: np.ndarray) -> dict[str, float]:
    """Two-way decomposition of a (T, I) matrix of pair scores (every text against every image): the
    share of its variance explained by a per-text effect, a per-image effect, and their interaction.

    A matcher must score *pairs*: a score that is a text prior plus an image prior (interaction near 0)
    cannot tell which text goes with which image, however well it separates true pairs from random ones."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean()
    text = centred.mean(axis=1, keepdims=True)  # (T, 1)
    image = centred.mean(axis=0, keepdims=True)  # (1, I)
    interaction = centred - text - image
    total = max(float((centred**2).sum()), 1e-300)
    return {
        "text": float((text**2).sum()) * scores.shape[1] / total,
        "image": float((image**2).sum()) * scores.shape[0] / total,
        "interaction": float((interaction**2).sum()) / total,
    }
