"""The two-stage order: recalled candidates, the top of them re-ranked by the cross-encoder.

One function shared by the service (`app.retrieval`) and the gallery evaluation (`model.evaluation`),
so the evaluation provably measures the order the service returns, tie-breaking included.
"""

from __future__ import annotations

import numpy as np


def rerank_order(rerank_scores: np.ndarray, num_recalled: int) -> np.ndarray:
    """Positions into the recall-ordered candidates, best first: (..., num_recalled) int64.

    `rerank_scores` (..., R) are the cross-encoder scores of the first R recalled candidates. Those R
    come first, by descending score (ties keep recall order); the other `num_recalled - R` follow
    them in recall order.
    """
    rerank_scores = np.asarray(rerank_scores)
    reranked = rerank_scores.shape[-1]
    assert reranked <= num_recalled, f"{reranked} re-rank scores for {num_recalled} recalled candidates"
    by_score = np.argsort(-rerank_scores, axis=-1, kind="stable")  # (..., R)
    rest = np.broadcast_to(
        np.arange(reranked, num_recalled), (*rerank_scores.shape[:-1], num_recalled - reranked)
    )
    return np.concatenate([by_score, rest], axis=-1).astype(np.int64, copy=False)
