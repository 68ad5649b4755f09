"""The recall-then-re-rank order on hand-made score lists."""

from __future__ import annotations

import numpy as np
import pytest

from model.ranking import rerank_order


def test_reranked_first_by_score_then_the_rest_in_recall_order():
    order = rerank_order(np.array([0.1, 2.0, -1.0]), num_recalled=6)
    assert order.tolist() == [1, 0, 2, 3, 4, 5]


def test_ties_keep_recall_order():
    order = rerank_order(np.array([1.0, 3.0, 1.0, 3.0]), num_recalled=4)
    assert order.tolist() == [1, 3, 0, 2]


def test_nothing_reranked_keeps_recall_order():
    assert rerank_order(np.zeros(0, np.float32), num_recalled=3).tolist() == [0, 1, 2]
    assert rerank_order(np.zeros(0, np.float32), num_recalled=0).tolist() == []


def test_everything_reranked():
    assert rerank_order(np.array([-2.0, 5.0, 0.5]), num_recalled=3).tolist() == [1, 2, 0]


def test_a_batch_of_queries_orders_each_row():
    scores = np.array([[0.0, 1.0], [1.0, 0.0]])  # (Q, R): two queries, two re-ranked each
    order = rerank_order(scores, num_recalled=4)
    assert order.tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]
    for row, row_scores in zip(order, scores, strict=True):
        assert row.tolist() == rerank_order(row_scores, 4).tolist()


def test_more_scores_than_candidates_is_refused():
    with pytest.raises(AssertionError, match="re-rank scores"):
        rerank_order(np.ones(3), num_recalled=2)
