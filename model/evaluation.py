"""Retrieval evaluation: the FashionBERT paper's sampled protocol and full-gallery retrieval as served.

Sampled (the paper's numbers): `num_queries` items drawn with a fixed seed; each query's true partner
plus `num_negatives` negatives from its own subcategory are scored by the cross-encoder (`match`) and
ranked, image->text (i2t: one image, candidate texts) and text->image (t2i: one text, candidate images).

Gallery (what the service does): the same query items against every item of the split; cosine
similarity of the one-modality embeddings (exact inner product, as faiss `IndexFlatIP` computes it),
then the top `recall_k` recalled and the top `rerank_k` of those re-scored by `match`, put in order
by `model.ranking.rerank_order`, the function the service orders its results with.

In both, a candidate whose text is identical to the query's true item's counts as correct: the two
cannot be told apart from the text. Ties rank pessimistically (see `model.metrics`), except in the
gallery re-rank, which breaks them as the service does: in recall order.

Report keys (the CLI writes the dict to JSON with --report); `{dir}` is `i2t` or `t2i`:
- `sampled/{dir}/R@1`, `R@5`, `R@10` (percent), `sampled/{dir}/MRR` (0..1);
  `sampled/accuracy` (percent of scored pairs with `logit > 0` iff the pair is correct);
  `sampled/auc` (ROC AUC of the logits over all scored pairs); `sampled/seconds` (wall time);
  `sampled/queries`, `sampled/candidates` (per query, the true partner included).
- `gallery/embedding/{dir}/R@1`, `R@5`, `R@10`, `MRR`, and `gallery/embedding/{dir}/R@{recall_k}`
  (the recall stage's ceiling for re-ranking); `gallery/embedding/seconds` (encoding both
  modalities of the whole gallery plus search).
- `gallery/rerank/{dir}/R@1`, `R@5`, `R@10`, `MRR`; `gallery/rerank/seconds` (the `match` calls alone).
  A correct item outside the re-ranked top keeps its embedding rank, so MRR stays comparable.
- `gallery/queries`, `gallery/size`, `gallery/recall_k`, `gallery/rerank_k`, `gallery/querybank_size`
  (bank items whose offsets normalised the recall scores; 0: plain cosine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from model.catalogue import Catalogue
from model.metrics import accuracy, mean_reciprocal_rank, rank_of_positive, recall_at_k, roc_auc
from model.pair_states import PairStates
from model.querybank import QueryBank, group_hashes
from model.ranking import rerank_order

logger = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i")
RECALL_KS = (1, 5, 10)
# Candidate pairs handed to one `match` call, in multiples of its batch size: bounds the gathered
# (pairs, N, D) patch array while keeping the device busy.
_PAIR_CHUNK_BATCHES = 8
# Elements of one (queries, gallery) similarity block: about 64 MiB of float32.
_SIMILARITY_BLOCK = 1 << 24


class Scorer(Protocol):
    """What evaluation needs from `FashionBertInference`; tests pass fakes with controlled scores."""

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, patch_features: np.ndarray, batch_size: int = ...) -> np.ndarray: ...

    def match(
        self, token_ids: Sequence[Sequence[int]], patch_features: np.ndarray, batch_size: int = ...
    ) -> np.ndarray: ...


class FusedScorer(Scorer, Protocol):
    """A scorer of a model with a fusion layer (`FashionBertInference`): pairs from each side's states."""

    def text_states(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]: ...

    def image_states(self, patch_features: np.ndarray) -> np.ndarray: ...

    def score_states(self, pairs: PairStates, batch_size: int = ...) -> np.ndarray: ...


@dataclass
class EvalConfig:
    num_queries: int = 1000  # query items drawn with `seed`; all items when the split is smaller
    num_negatives: int = 100  # sampled protocol: negatives per query beside the true partner
    seed: int = 0
    recall_k: int = 100  # gallery: candidates recalled by embeddings, then re-ranked by `match`
    batch_size: int = 128  # pairs (or items) per forward pass


# -- negatives --------------------------------------------------------------------------------------------


class NegativeSampler:
    """Item indices grouped by subcategory and category once, so drawing negatives needs no scan per query."""

    def __init__(self, catalogue: Catalogue):
        self.category, self.by_category = _group([item.category for item in catalogue.items])
        # Keyed with the category: the same subcategory name may sit under two categories.
        self.subcategory, self.by_subcategory = _group(
            [(item.category, item.subcategory) for item in catalogue.items]
        )

    def sample(self, index: int, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` distinct items other than `index`: its subcategory first, then its category, then any."""
        assert 0 <= n < len(self.category), f"{n} negatives need at least {n + 1} items"
        subcategory, category = self.subcategory[index], self.category[index]

        def same_subcategory() -> np.ndarray:
            members = self.by_subcategory[subcategory]
            return members[members != index]

        def same_category() -> np.ndarray:
            members = self.by_category[category]
            return members[self.subcategory[members] != subcategory]

        def anything() -> np.ndarray:
            return np.flatnonzero(self.category != category)

        chosen: list[np.ndarray] = []
        needed = n
        for tier in (same_subcategory, same_category, anything):
            if needed == 0:
                break
            pool = tier()
            take = min(needed, len(pool))
            if take:
                chosen.append(rng.choice(pool, size=take, replace=False))
                needed -= take
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def negative_pool(catalogue: Catalogue, index: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` distinct negatives for item `index`: same subcategory, falling back to category, then anything."""
    return NegativeSampler(catalogue).sample(index, rng, n)


# -- the two protocols ------------------------------------------------------------------------------------


def sampled_candidates(catalogue: Catalogue, config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sampled protocol's draw, fixed by `config.seed`: (Q,) query items and each one's (Q, K)
    negatives from its subcategory (fallback: category, then anything)."""
    n = len(catalogue)
    assert n >= 2, "the sampled protocol needs at least two items"
    rng = np.random.default_rng(config.seed)
    queries = draw_queries(n, config.num_queries, rng)
    sampler = NegativeSampler(catalogue)
    num_negatives = min(config.num_negatives, n - 1)
    return queries, np.stack([sampler.sample(int(q), rng, num_negatives) for q in queries])


def evaluate_sampled(
    inference: Scorer,
    catalogue: Catalogue,
    patch_features: np.ndarray,
    config: EvalConfig,
    querybank: QueryBank | None = None,
) -> dict[str, float]:
    """The paper's protocol: rank each query's partner among 1 + num_negatives candidates by `match`.

    With a `querybank`, by the score the service ranks with: the logit's tower term is the towers' cosine
    minus the candidate's querybank offset (text offsets for image-to-text, image offsets for
    text-to-image), so each query's true pair is scored once per direction.
    """
    start = time.perf_counter()
    n = len(catalogue)
    assert len(patch_features) == n, f"{len(patch_features)} patch feature rows for {n} items"
    queries, negatives = sampled_candidates(catalogue, config)
    num_negatives = negatives.shape[1]
    candidates = np.concatenate([queries[:, None], negatives], axis=1)  # (Q, 1 + K), partner first

    used = np.unique(candidates)
    token_ids = dict(
        zip(used.tolist(), inference.tokenize([catalogue[int(i)].text for i in used]), strict=True)
    )
    # Each query's true pair is scored once and shared by both directions.
    q_rep = np.repeat(queries, num_negatives)
    # Pairs in order: true pairs, i2t false pairs (candidate texts), t2i false pairs (candidate images),
    # and with a querybank the true pairs again, normalised on the image side.
    text_index = np.concatenate([queries, negatives.ravel(), q_rep])
    image_index = np.concatenate([queries, q_rep, negatives.ravel()])
    num_queries, similarity = len(queries), None
    if querybank is not None:
        text_index, image_index = np.append(text_index, queries), np.append(image_index, queries)
        text_side = np.arange(len(text_index)) < num_queries + negatives.size
        similarity = _served_tower_term(
            inference, catalogue, patch_features, querybank, text_index, image_index, text_side
        )
    logits = _match_pairs(
        inference, token_ids, patch_features, text_index, image_index, config.batch_size, similarity
    )
    positive_logits = logits[:num_queries, None]
    i2t_logits = logits[num_queries : num_queries + negatives.size].reshape(negatives.shape)
    t2i_logits = logits[num_queries + negatives.size : num_queries + 2 * negatives.size].reshape(
        negatives.shape
    )
    t2i_positive_logits = logits[-num_queries:, None] if querybank is not None else positive_logits

    codes = text_codes(catalogue)
    correct = codes[candidates] == codes[queries][:, None]  # (Q, 1 + K), identical text included
    report: dict[str, float] = {}
    for direction, positives, negative_logits in (
        ("i2t", positive_logits, i2t_logits),
        ("t2i", t2i_positive_logits, t2i_logits),
    ):
        scores = np.concatenate([positives, negative_logits], axis=1)
        report.update(_rank_metrics(f"sampled/{direction}", rank_of_positive(scores, correct)))
    pair_labels = np.concatenate([correct[:, 0], correct[:, 1:].ravel(), correct[:, 1:].ravel()])
    if querybank is not None:
        pair_labels = np.append(pair_labels, correct[:, 0])
    report["sampled/accuracy"] = accuracy(logits, pair_labels)
    report["sampled/auc"] = roc_auc(logits, pair_labels)
    report["sampled/seconds"] = time.perf_counter() - start
    report["sampled/queries"] = num_queries
    report["sampled/candidates"] = 1 + num_negatives
    report["sampled/querybank_size"] = 0 if querybank is None else len(querybank.groups)
    logger.info("sampled evaluation: %d queries x %d candidates", num_queries, 1 + num_negatives)
    return report


def evaluate_gallery(
    inference: Scorer,
    catalogue: Catalogue,
    patch_features: np.ndarray,
    config: EvalConfig,
    rerank_k: int | None = None,
    querybank: QueryBank | None = None,
) -> dict[str, float]:
    """Full-gallery retrieval as served: embedding recall of the top recall_k, `match` re-ranks the top rerank_k.

    With a `querybank` the recall scores are querybank-normalised (`model.querybank`), as a bundle built
    with one serves them, and the re-ranking logit adds those scores as its tower term, as the service does.
    """
    n = len(catalogue)
    assert len(patch_features) == n, f"{len(patch_features)} patch feature rows for {n} items"
    assert n >= 1, "an empty gallery has nothing to retrieve"
    recall_k = min(config.recall_k, n)
    rerank_k = min(recall_k if rerank_k is None else rerank_k, recall_k)
    assert recall_k >= 1 and rerank_k >= 0, "recall_k must be positive and rerank_k not negative"
    queries = draw_queries(n, config.num_queries, np.random.default_rng(config.seed))
    codes = text_codes(catalogue)
    report: dict[str, float] = {}

    start = time.perf_counter()
    token_ids = inference.tokenize([item.text for item in catalogue.items])
    text_embeddings = inference.encode_token_ids(token_ids, batch_size=config.batch_size)  # (n, E)
    image_embeddings = inference.encode_images(patch_features, batch_size=config.batch_size)  # (n, E)
    groups = group_hashes([item.group for item in catalogue.items]) if querybank is not None else None
    recalled: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for direction in DIRECTIONS:
        query_side, gallery_side = (
            (image_embeddings, text_embeddings) if direction == "i2t" else (text_embeddings, image_embeddings)
        )
        offsets = None
        if querybank is not None:
            offsets, _ = querybank.offsets("text" if direction == "i2t" else "image", gallery_side, groups)
        ranks, top, top_scores = _embedding_search(
            query_side[queries], gallery_side, codes[queries], codes, recall_k, offsets
        )
        recalled[direction] = ranks, top, top_scores
        report.update(_rank_metrics(f"gallery/embedding/{direction}", ranks))
        if recall_k not in RECALL_KS:
            report.update(
                {f"gallery/embedding/{direction}/{k}": v for k, v in recall_at_k(ranks, (recall_k,)).items()}
            )
    report["gallery/embedding/seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    for direction in DIRECTIONS:
        embedding_ranks, recalled_top, recall_scores = recalled[direction]  # (Q,), (Q, recall_k) x 2
        top = recalled_top[:, :rerank_k]  # (Q, rerank_k)
        repeated = np.repeat(queries, rerank_k)
        text_index, image_index = (top.ravel(), repeated) if direction == "i2t" else (repeated, top.ravel())
        # Normalised recall scores are the logit's tower term, as the service hands them over; plain ones
        # the model recomputes itself.
        similarity = recall_scores[:, :rerank_k].ravel() if querybank is not None else None
        logits = _match_pairs(
            inference, token_ids, patch_features, text_index, image_index, config.batch_size, similarity
        ).reshape(top.shape)
        correct = codes[recalled_top] == codes[queries][:, None]  # (Q, recall_k)
        ranks = reranked_ranks(logits, correct, embedding_ranks)
        report.update(_rank_metrics(f"gallery/rerank/{direction}", ranks))
    report["gallery/rerank/seconds"] = time.perf_counter() - start
    report.update(
        {
            "gallery/queries": len(queries),
            "gallery/size": n,
            "gallery/recall_k": recall_k,
            "gallery/rerank_k": rerank_k,
            "gallery/querybank_size": 0 if querybank is None else len(querybank.groups),
        }
    )
    logger.info(
        "gallery evaluation: %d queries over %d items, recall %d, re-rank %d",
        len(queries),
        n,
        recall_k,
        rerank_k,
    )
    return report


def evaluate(
    inference: Scorer,
    catalogue: Catalogue,
    patch_features: np.ndarray,
    config: EvalConfig,
    gallery: bool = True,
    rerank_k: int | None = None,
    sampled: bool = True,
    querybank: QueryBank | None = None,
) -> dict[str, float]:
    """The sampled protocol and full-gallery retrieval (each unless switched off): one flat report."""
    assert sampled or gallery, "nothing to evaluate"
    report = evaluate_sampled(inference, catalogue, patch_features, config, querybank) if sampled else {}
    if gallery:
        report.update(evaluate_gallery(inference, catalogue, patch_features, config, rerank_k, querybank))
    return report


def format_table(report: Mapping[str, float]) -> str:
    """The report as a printed table: one row per protocol, Recall@K and MRR for both directions."""
    sampled = "sampled"
    if "sampled/candidates" in report:
        sampled = f"sampled (1 in {int(report['sampled/candidates'])})"
    embedding, rerank = "gallery embedding-only", "gallery recall + re-rank"
    if "gallery/size" in report:
        embedding += f" ({int(report['gallery/size'])} items)"
        rerank = (
            f"gallery recall {int(report['gallery/recall_k'])} + re-rank {int(report['gallery/rerank_k'])}"
        )
    rows = [
        (label, prefix)
        for label, prefix in (
            (sampled, "sampled"),
            (embedding, "gallery/embedding"),
            (rerank, "gallery/rerank"),
        )
        if any(key.startswith(f"{prefix}/{direction}/") for key in report for direction in DIRECTIONS)
    ]
    columns = [f"R@{k}" for k in RECALL_KS] + ["MRR"]
    cell = 7
    label_width = max([len(label) for label, _ in rows] + [8])

    def fmt(key: str, column: str) -> str:
        value = report.get(key)
        if value is None:
            return "-".rjust(cell)
        return f"{value:{cell}.3f}" if column == "MRR" else f"{value:{cell}.1f}"

    group_width = cell * len(columns)
    header = "".join(column.rjust(cell) for column in columns)
    lines = [
        " " * label_width
        + " | "
        + "image -> text".center(group_width)
        + " | "
        + "text -> image".center(group_width),
        "protocol".ljust(label_width) + " | " + header + " | " + header,
    ]
    lines.append("-" * len(lines[1]))
    for label, prefix in rows:
        cells = ["".join(fmt(f"{prefix}/{d}/{column}", column) for column in columns) for d in DIRECTIONS]
        lines.append(label.ljust(label_width) + " | " + " | ".join(cells))
    if "sampled/accuracy" in report:
        lines.append(f"alignment accuracy {report['sampled/accuracy']:.1f}%, AUC {report['sampled/auc']:.3f}")
    timings = [
        f"{name} {report[key]:.1f} s"
        for name, key in (
            ("sampled", "sampled/seconds"),
            ("embedding", "gallery/embedding/seconds"),
            ("re-rank", "gallery/rerank/seconds"),
        )
        if key in report
    ]
    if timings:
        lines.append("wall time: " + ", ".join(timings))
    return "\n".join(lines)


# -- pieces -----------------------------------------------------------------------------------------------


def draw_queries(n: int, num_queries: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted query indices: `num_queries` drawn without replacement, or all `n` when fewer."""
    if num_queries >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=num_queries, replace=False))


def text_codes(catalogue: Catalogue) -> np.ndarray:
    """(n,) int codes equal exactly where item texts are identical: the 'counts as correct' relation."""
    lookup: dict[str, int] = {}
    return np.fromiter(
        (lookup.setdefault(item.text, len(lookup)) for item in catalogue.items),
        dtype=np.int64,
        count=len(catalogue),
    )


def _group(keys: Sequence[Hashable]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(n,) integer code per key and, per code, the sorted indices that carry it."""
    lookup: dict[Hashable, int] = {}
    codes = np.fromiter(
        (lookup.setdefault(key, len(lookup)) for key in keys), dtype=np.int64, count=len(keys)
    )
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(lookup)))[:-1]
    return codes, np.split(order, bounds)


def reranked_ranks(logits: np.ndarray, correct: np.ndarray, embedding_ranks: np.ndarray) -> np.ndarray:
    """(Q,) rank of each query's best correct candidate once the first R of its recalled (Q, K) candidates
    are put in order by the (Q, R) `logits`, as the service orders them (`rerank_order`); `correct` (Q, K)
    marks the candidates that count as correct. A query whose correct item was not recalled keeps its
    embedding rank, which lies past K."""
    ordered = np.take_along_axis(correct, rerank_order(logits, correct.shape[1]), axis=1)
    found = ordered.any(axis=1)
    ranks = embedding_ranks.copy()
    ranks[found] = 1 + ordered[found].argmax(axis=1)
    return ranks


def _rank_metrics(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    metrics = {f"{prefix}/{name}": value for name, value in recall_at_k(ranks, RECALL_KS).items()}
    metrics[f"{prefix}/MRR"] = mean_reciprocal_rank(ranks)
    return metrics


def _match_pairs(
    inference: Scorer,
    token_ids: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    patch_features: np.ndarray,
    text_index: np.ndarray,
    image_index: np.ndarray,
    batch_size: int,
    tower_similarity: np.ndarray | None = None,
) -> np.ndarray:
    """`match` logits of pairs (text of item text_index[i], image of item image_index[i]): (P,) float32.
    `tower_similarity` (P,), when given, replaces the pairs' tower cosine in the logit (see `match`)."""
    if getattr(getattr(inference, "config", None), "fusion_layer", 0) > 0:
        return _match_pairs_from_states(
            cast(FusedScorer, inference),
            token_ids,
            patch_features,
            text_index,
            image_index,
            batch_size,
            tower_similarity,
        )
    chunk = batch_size * _PAIR_CHUNK_BATCHES
    out = [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(text_index), chunk):
        texts = [token_ids[int(i)] for i in text_index[start : start + chunk]]
        patches = patch_features[image_index[start : start + chunk]]  # gathered per chunk: (P, N, D)
        given = (
            {} if tower_similarity is None else {"tower_similarity": tower_similarity[start : start + chunk]}
        )
        out.append(
            np.asarray(inference.match(texts, patches, batch_size=batch_size, **given), dtype=np.float32)
        )
    return np.concatenate(out)


def _match_pairs_from_states(
    inference: FusedScorer,
    token_ids: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    patch_features: np.ndarray,
    text_index: np.ndarray,
    image_index: np.ndarray,
    batch_size: int,
    tower_similarity: np.ndarray | None,
) -> np.ndarray:
    """`_match_pairs` for a model with a fusion layer, as the service scores: each item's sides through the
    layers below it once, then every pair through the layers above (the same logits, to float16 rounding)."""
    texts, text_rows = np.unique(text_index, return_inverse=True)
    images, image_rows = np.unique(image_index, return_inverse=True)
    text_ids = [token_ids[int(i)] for i in texts]
    text_states, text_mask = inference.text_states(text_ids)
    image_states = inference.image_states(patch_features[images])
    if tower_similarity is None:  # the towers' cosine, as `match` computes it
        text_embeddings = inference.encode_token_ids(text_ids)
        image_embeddings = inference.encode_images(patch_features[images])
        tower_similarity = np.einsum("pe,pe->p", text_embeddings[text_rows], image_embeddings[image_rows])
    chunk = batch_size * _PAIR_CHUNK_BATCHES
    out = [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(text_index), chunk):
        t, i = text_rows[start : start + chunk], image_rows[start : start + chunk]
        pairs = PairStates(
            text_states[t], text_mask[t], image_states[i], tower_similarity[start : start + chunk]
        )
        out.append(inference.score_states(pairs, batch_size=batch_size))
    return np.concatenate(out).astype(np.float32)


def _served_tower_term(
    inference: Scorer,
    catalogue: Catalogue,
    patch_features: np.ndarray,
    querybank: QueryBank,
    text_index: np.ndarray,
    image_index: np.ndarray,
    text_side: np.ndarray,
) -> np.ndarray:
    """(P,) the towers' cosine of each pair minus the querybank offset of its candidate: the text's where
    `text_side`, else the image's. Offsets are centred over the whole split, as a gallery's are."""
    texts = inference.encode_token_ids(inference.tokenize([item.text for item in catalogue.items]))
    images = inference.encode_images(patch_features)
    groups = group_hashes([item.group for item in catalogue.items])
    text_offsets, _ = querybank.offsets("text", texts, groups)
    image_offsets, _ = querybank.offsets("image", images, groups)
    cosine = np.einsum("pe,pe->p", texts[text_index], images[image_index])
    return np.where(text_side, cosine - text_offsets[text_index], cosine - image_offsets[image_index]).astype(
        np.float32
    )


def _embedding_search(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    k: int,
    gallery_offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cosine search, minus each gallery item's querybank offset when given: (Q,) rank of the best
    correct item over the whole gallery, (Q, k) top indices and (Q, k) their scores."""
    n = len(gallery_embeddings)
    block = max(1, _SIMILARITY_BLOCK // max(n, 1))
    gallery = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    ranks, tops, top_scores = [], [], []
    for start in range(0, len(query_embeddings), block):
        scores = np.asarray(query_embeddings[start : start + block], dtype=np.float32) @ gallery.T  # (B, n)
        if gallery_offsets is not None:
            scores -= gallery_offsets[None, :]
        correct = query_codes[start : start + block, None] == gallery_codes[None, :]
        ranks.append(rank_of_positive(scores, correct))
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < n
            else np.tile(np.arange(n), (len(scores), 1))
        )
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        tops.append(np.take_along_axis(top, order, axis=1))
        top_scores.append(np.take_along_axis(scores, tops[-1], axis=1))
    if not ranks:
        return np.zeros(0, dtype=np.int64), np.zeros((0, k), dtype=np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ranks), np.concatenate(tops), np.concatenate(top_scores)
