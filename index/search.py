"""Filtered k-NN search over a recall index: only allowed rows come back, -1 pads what is missing.

Removed items and category filters become one faiss IDSelectorBitmap, applied inside the index so a
query still gets k live results. Index types that take no search parameters (IndexPQ) are searched
deeper and filtered afterwards instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from index.factory import sub_indexes


def selector_bitmap(allowed: np.ndarray) -> np.ndarray:
    """Bool mask (n,) -> the little-endian bit array IDSelectorBitmap reads (bit i of byte i >> 3)."""
    return np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")


@dataclass(frozen=True)
class RowFilter:
    """Rows a search may return, as a bool mask plus its faiss bitmap and count, computed once.

    A bundle keeps one for its live rows, so excluding removed items costs nothing per query.
    """

    mask: np.ndarray
    bitmap: np.ndarray
    count: int


def row_filter(mask: np.ndarray) -> RowFilter:
    mask = np.asarray(mask, dtype=bool)
    return RowFilter(mask, selector_bitmap(mask), int(np.count_nonzero(mask)))


def search_parameters(
    index: faiss.Index, nprobe: int | None, selector: faiss.IDSelector | None
) -> faiss.SearchParameters:
    """Per-call parameters (thread-safe, unlike setting index.nprobe) for the index and what it wraps."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = search_parameters(index.index, nprobe, selector)
        return params
    if isinstance(index, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = index.k_factor
        params.base_index_params = search_parameters(index.base_index, nprobe, selector)
        params.sel = selector
        return params
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(nprobe or index.nprobe, index.nlist)
        params.sel = selector
        return params
    params = faiss.SearchParameters()
    params.sel = selector
    return params


def inverted_lists(index: faiss.Index) -> int:
    """nlist of the index's inverted file, 0 without one."""
    return next((sub.nlist for sub in sub_indexes(index) if isinstance(sub, faiss.IndexIVF)), 0)


def filtered_search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | RowFilter | None = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (q, k) float32, rows (q, k) int64) among rows where `allowed` (n,) is True.

    With a selective filter the IVF visits proportionally more lists (nprobe / fraction allowed), so
    a small category still fills its k results.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    assert queries.shape[1] == index.d, f"queries are {queries.shape[1]}-d, the index is {index.d}-d"
    assert k >= 1, "k must be >= 1"
    if allowed is not None:
        allowed = allowed if isinstance(allowed, RowFilter) else row_filter(allowed)
        assert len(allowed.mask) == index.ntotal, "the allowed mask must cover every row of the index"
        n_allowed = allowed.count
        if n_allowed == index.ntotal:
            allowed = None
        elif n_allowed == 0:
            return _empty(len(queries), k)
    nlist = inverted_lists(index)
    if nlist and nprobe is not None:
        nprobe = min(nprobe, nlist)
    if allowed is None:
        params = search_parameters(index, nprobe, None) if nlist else None
        return _search(index, queries, min(k, index.ntotal), params, k)

    if nlist:
        base = nprobe or next(sub.nprobe for sub in sub_indexes(index) if isinstance(sub, faiss.IndexIVF))
        nprobe = min(nlist, math.ceil(base * index.ntotal / n_allowed))
    # The selector holds only a pointer: `allowed.bitmap` stays alive for the whole search.
    selector = faiss.IDSelectorBitmap(len(allowed.mask), faiss.swig_ptr(allowed.bitmap))
    try:
        scores, rows = _search(
            index, queries, min(k, n_allowed), search_parameters(index, nprobe, selector), k
        )
    except RuntimeError:
        # Index types without selector support: search deep enough that k allowed rows survive.
        depth = min(index.ntotal, k + index.ntotal - n_allowed)
        scores, rows = _search(index, queries, depth, None, depth)
    return _keep(scores, rows, allowed.mask, k)


def _search(
    index: faiss.Index, queries: np.ndarray, depth: int, params: faiss.SearchParameters | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    if depth == 0:
        return _empty(len(queries), k)
    scores, rows = index.search(queries, depth, params=params)
    if depth < k:
        pad = k - depth
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores.astype(np.float32), rows.astype(np.int64)


def _keep(scores: np.ndarray, rows: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop rows that are not allowed (a safety net after a selector; the filter after a deep search)."""
    ok = rows >= 0
    ok[ok] = allowed[rows[ok]]
    out_scores, out_rows = _empty(len(rows), k)
    for q in range(len(rows)):
        kept = np.flatnonzero(ok[q])[:k]
        out_scores[q, : len(kept)] = scores[q, kept]
        out_rows[q, : len(kept)] = rows[q, kept]
    return out_scores, out_rows


def _empty(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


def normalised_search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    offsets: np.ndarray,
    allowed: np.ndarray | RowFilter | None = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by querybank-normalised score, inner product minus the row's offset (`model.querybank`).

    The index ranks by inner product alone, so it is searched deeper, doubling, until no row past the
    depth fetched could still enter: one there scores at most the last fetched inner product minus the
    smallest offset. Exact on an exact index; as good as its recall on an approximate one.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    lowest = float(offsets.min()) if len(offsets) else 0.0
    depth = min(index.ntotal, 2 * k)
    while True:
        scores, rows = filtered_search(index, queries, max(depth, 1), allowed, nprobe)
        adjusted = np.where(rows >= 0, scores - offsets[np.maximum(rows, 0)], -np.inf).astype(np.float32)
        order = np.argsort(-adjusted, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(adjusted, order, axis=1)
        exhausted = depth >= index.ntotal or bool((rows[:, -1] < 0).all())
        kth = top_scores[:, -1] if top_scores.shape[1] == k else np.full(len(queries), -np.inf)
        if exhausted or bool((kth >= scores[:, -1] - lowest).all()):
            top_rows = np.take_along_axis(rows, order, axis=1)
            if top_rows.shape[1] < k:  # a catalogue smaller than k: pad as filtered_search does
                pad = k - top_rows.shape[1]
                top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
                top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
            top_scores[top_rows < 0] = -np.inf
            return top_scores, top_rows
        depth = min(index.ntotal, 2 * depth)
