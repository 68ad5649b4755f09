"""Evaluation protocols with a fake scorer whose answers the test controls, plus one real tiny-model smoke run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from model.catalogue import Catalogue, Item
from model.evaluation import (
    EvalConfig,
    NegativeSampler,
    draw_queries,
    evaluate,
    evaluate_gallery,
    evaluate_sampled,
    format_table,
    negative_pool,
)
from model.metrics import rank_of_positive, recall_at_k
from model.querybank import QueryBank, group_hashes

SUBCATEGORIES = {"top": ("shirt", "tee"), "shoe": ("boot", "sneaker")}


def make_catalogue(per_subcategory: int = 6, texts: Sequence[str] | None = None) -> Catalogue:
    """Two categories of two subcategories each; item texts are unique unless given."""
    items = []
    for category, subcategories in SUBCATEGORIES.items():
        for subcategory in subcategories:
            for _ in range(per_subcategory):
                i = len(items)
                text = texts[i] if texts is not None else f"{subcategory} number {i}"
                items.append(Item(str(i), text, text, f"/img/{i}.jpg", category, subcategory, f"g{i}"))
    return Catalogue("test", "memory", items)


def item_patches(n: int) -> np.ndarray:
    """(n, 2, 3) patch features that carry the item's index, so the fake scorer knows whose image it sees."""
    patches = np.zeros((n, 2, 3), dtype=np.float16)
    patches[:, 0, 0] = np.arange(n)
    return patches


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeInference:
    """A scorer with controlled answers: `match` is +sign for identical text and -sign otherwise;
    embeddings put each text on its own random direction and each image near its text's, `noise` apart."""

    def __init__(self, catalogue: Catalogue, sign: float = 1.0, noise: float = 0.0, seed: int = 0):
        self.code = {}
        for item in catalogue.items:
            self.code.setdefault(item.text, len(self.code))
        self.item_code = np.array([self.code[item.text] for item in catalogue.items])
        rng = np.random.default_rng(seed)
        self.text_vectors = _normalise(rng.normal(size=(len(self.code), 8)))
        self.image_vectors = _normalise(
            self.text_vectors[self.item_code] + noise * rng.normal(size=(len(catalogue), 8))
        )
        self.sign = sign
        self.pairs_scored = 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.code[text]] for text in texts]

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 256) -> np.ndarray:
        return self.text_vectors[[ids[0] for ids in token_ids]]

    def encode_images(self, patch_features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self.image_vectors[patch_features[:, 0, 0].astype(int)]

    def match(
        self, token_ids: Sequence[Sequence[int]], patch_features: np.ndarray, batch_size: int = 128
    ) -> np.ndarray:
        assert len(token_ids) == len(patch_features)
        self.pairs_scored += len(token_ids)
        text = np.array([ids[0] for ids in token_ids])
        image_text = self.item_code[patch_features[:, 0, 0].astype(int)]
        return np.where(text == image_text, self.sign, -self.sign).astype(np.float32)


# -- negatives ---------------------------------------------------------------------------------------------


def test_negative_pool_prefers_subcategory_then_category_then_anything():
    catalogue = make_catalogue()  # items 0-5 shirt, 6-11 tee, 12-17 boot, 18-23 sneaker
    rng = np.random.default_rng(0)

    same_subcategory = negative_pool(catalogue, 2, rng, 5)
    assert set(same_subcategory.tolist()) == {0, 1, 3, 4, 5}

    with_category = negative_pool(catalogue, 2, rng, 8)
    assert {0, 1, 3, 4, 5} <= set(with_category.tolist())
    assert all(6 <= i < 12 for i in set(with_category.tolist()) - {0, 1, 3, 4, 5})

    with_anything = negative_pool(catalogue, 2, rng, 14)
    assert set(range(12)) - {2} <= set(with_anything.tolist())
    assert len(set(with_anything.tolist()) & set(range(12, 24))) == 3

    everything = negative_pool(catalogue, 2, rng, 23)
    assert sorted(everything.tolist()) == [i for i in range(24) if i != 2]


def test_negative_pool_distinct_never_self_and_deterministic():
    catalogue = make_catalogue()
    for index in range(len(catalogue)):
        pool = negative_pool(catalogue, index, np.random.default_rng(index), 10)
        assert len(pool) == 10 and len(set(pool.tolist())) == 10
        assert index not in pool
    first = negative_pool(catalogue, 7, np.random.default_rng(3), 4)
    again = negative_pool(catalogue, 7, np.random.default_rng(3), 4)
    np.testing.assert_array_equal(first, again)
    with pytest.raises(AssertionError):
        negative_pool(catalogue, 0, np.random.default_rng(0), len(catalogue))


# -- sampled protocol --------------------------------------------------------------------------------------


def test_sampled_perfect_scorer():
    catalogue = make_catalogue()
    inference = FakeInference(catalogue)
    config = EvalConfig(num_queries=10, num_negatives=5, batch_size=4)
    report = evaluate_sampled(inference, catalogue, item_patches(len(catalogue)), config)
    for direction in ("i2t", "t2i"):
        assert report[f"sampled/{direction}/R@1"] == 100.0
        assert report[f"sampled/{direction}/MRR"] == 1.0
    assert report["sampled/accuracy"] == 100.0
    assert report["sampled/auc"] == 1.0
    assert report["sampled/queries"] == 10 and report["sampled/candidates"] == 6
    assert inference.pairs_scored == 10 * (1 + 2 * 5)  # the true pair once, negatives in both directions


def test_sampled_reversed_scorer_ranks_partner_last():
    catalogue = make_catalogue()
    config = EvalConfig(num_queries=100, num_negatives=5)  # more queries than items: all 24 are queries
    report = evaluate_sampled(FakeInference(catalogue, sign=-1.0), catalogue, item_patches(24), config)
    assert report["sampled/queries"] == 24
    for direction in ("i2t", "t2i"):
        assert report[f"sampled/{direction}/R@1"] == 0.0
        assert report[f"sampled/{direction}/R@5"] == 0.0
        assert report[f"sampled/{direction}/R@10"] == 100.0
        assert report[f"sampled/{direction}/MRR"] == pytest.approx(1 / 6)
    assert report["sampled/accuracy"] == 0.0
    assert report["sampled/auc"] == 0.0


def test_sampled_identical_text_counts_as_correct():
    # Pairs of items share a text (colour variants): a text scorer cannot separate them, and must not lose for it.
    texts = [f"text {i // 2}" for i in range(24)]
    catalogue = make_catalogue(texts=texts)
    config = EvalConfig(
        num_queries=24, num_negatives=5
    )  # the whole subcategory: the twin is always a candidate
    report = evaluate_sampled(FakeInference(catalogue), catalogue, item_patches(24), config)
    assert report["sampled/i2t/R@1"] == 100.0 and report["sampled/t2i/R@1"] == 100.0
    assert report["sampled/accuracy"] == 100.0 and report["sampled/auc"] == 1.0


def test_sampled_is_deterministic_for_a_seed():
    catalogue = make_catalogue()
    inference = FakeInference(catalogue, noise=1.0)
    inference.match = lambda token_ids, patches, batch_size=128: np.asarray(  # noisy scorer
        [ids[0] * 0.37 % 1 + p[0, 0] * 0.11 % 1 for ids, p in zip(token_ids, patches, strict=True)],
        np.float32,
    )
    config = EvalConfig(num_queries=8, num_negatives=7, seed=5)
    first = evaluate_sampled(inference, catalogue, item_patches(24), config)
    second = evaluate_sampled(inference, catalogue, item_patches(24), config)
    first.pop("sampled/seconds"), second.pop("sampled/seconds")
    assert first == second


# -- full gallery ------------------------------------------------------------------------------------------


def test_gallery_perfect_embeddings():
    catalogue = make_catalogue(texts=[f"text {i // 2}" for i in range(24)])  # twins tie, both correct
    report = evaluate_gallery(FakeInference(catalogue), catalogue, item_patches(24), EvalConfig(recall_k=5))
    for stage in ("embedding", "rerank"):
        for direction in ("i2t", "t2i"):
            assert report[f"gallery/{stage}/{direction}/R@1"] == 100.0
            assert report[f"gallery/{stage}/{direction}/MRR"] == 1.0
    assert (
        report["gallery/size"] == 24 and report["gallery/recall_k"] == 5 and report["gallery/rerank_k"] == 5
    )


def test_gallery_rerank_fixes_bad_embeddings():
    catalogue = make_catalogue()
    inference = FakeInference(catalogue, noise=1.5)
    patches = item_patches(24)
    full = evaluate_gallery(inference, catalogue, patches, EvalConfig(recall_k=24))
    for direction in ("i2t", "t2i"):
        assert full[f"gallery/embedding/{direction}/R@1"] < 100.0
        assert full[f"gallery/rerank/{direction}/R@1"] == 100.0  # everything recalled, match is perfect

    # Re-ranking can only find what recall found: R@1 after re-ranking equals embedding R@recall_k.
    narrow = evaluate_gallery(inference, catalogue, patches, EvalConfig(recall_k=5))
    for direction in ("i2t", "t2i"):
        assert narrow[f"gallery/rerank/{direction}/R@1"] == narrow[f"gallery/embedding/{direction}/R@5"]
        assert narrow[f"gallery/rerank/{direction}/MRR"] >= narrow[f"gallery/embedding/{direction}/MRR"]

    # Only the top rerank_k are re-scored; the recalled ones below keep their embedding order.
    partial = evaluate_gallery(inference, catalogue, patches, EvalConfig(recall_k=12), rerank_k=3)
    ranks_3 = evaluate_gallery(inference, catalogue, patches, EvalConfig(recall_k=3))
    for direction in ("i2t", "t2i"):
        assert partial[f"gallery/rerank/{direction}/R@1"] == ranks_3[f"gallery/rerank/{direction}/R@1"]
        for k in (5, 10):
            assert (
                partial[f"gallery/rerank/{direction}/R@{k}"]
                == partial[f"gallery/embedding/{direction}/R@{k}"]
            )
    assert partial["gallery/embedding/i2t/R@12"] >= partial["gallery/embedding/i2t/R@10"]


def test_gallery_rerank_scores_only_recalled_pairs():
    catalogue = make_catalogue()
    inference = FakeInference(catalogue, noise=1.0)
    evaluate_gallery(
        inference, catalogue, item_patches(24), EvalConfig(num_queries=10, recall_k=7, batch_size=3)
    )
    assert inference.pairs_scored == 2 * 10 * 7


class TowerTermFake(FakeInference):
    """Also takes the service's `tower_similarity` and returns it as the logit: re-ranking by it alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed: list[np.ndarray] = []

    def match(self, token_ids, patch_features, batch_size=128, tower_similarity=None):
        assert tower_similarity is not None, "with a querybank the recall scores are the tower term"
        self.handed.append(np.asarray(tower_similarity))
        return np.asarray(tower_similarity, np.float32)


def test_gallery_querybank_ranks_by_normalised_scores_and_hands_them_to_match():
    catalogue = make_catalogue()
    inference = TowerTermFake(catalogue, noise=1.2, seed=2)
    rng = np.random.default_rng(5)
    bank = QueryBank(
        _normalise(rng.normal(size=(40, 8))), _normalise(rng.normal(size=(40, 8))), np.arange(40), beta=8.0
    )
    config = EvalConfig(recall_k=6)
    report = evaluate_gallery(inference, catalogue, item_patches(24), config, querybank=bank)

    groups = group_hashes([item.group for item in catalogue.items])
    texts, images = inference.text_vectors[inference.item_code], inference.image_vectors
    correct = inference.item_code[:, None] == inference.item_code[None, :]
    for direction, queries, gallery, side in (
        ("i2t", images, texts, "text"),
        ("t2i", texts, images, "image"),
    ):
        scores = queries @ gallery.T - bank.offsets(side, gallery, groups)[0][None, :]
        expected = recall_at_k(rank_of_positive(scores, correct), (1, 5))
        assert report[f"gallery/embedding/{direction}/R@1"] == pytest.approx(expected["R@1"])
        assert report[f"gallery/embedding/{direction}/R@5"] == pytest.approx(expected["R@5"])
        # The logit is the normalised score itself, so re-ranking keeps the recall order.
        assert report[f"gallery/rerank/{direction}/R@1"] == report[f"gallery/embedding/{direction}/R@1"]
    plain = evaluate_gallery(FakeInference(catalogue, noise=1.2, seed=2), catalogue, item_patches(24), config)
    assert plain["gallery/querybank_size"] == 0 and report["gallery/querybank_size"] == 40
    handed = np.concatenate(inference.handed)
    assert len(handed) == 2 * 24 * 6 and np.all(np.diff(handed.reshape(-1, 6), axis=1) <= 1e-6)


def test_sampled_querybank_ranks_by_the_served_score():
    catalogue = make_catalogue()
    inference = TowerTermFake(catalogue, noise=1.2, seed=2)
    rng = np.random.default_rng(7)
    bank = QueryBank(
        _normalise(rng.normal(size=(30, 8))), _normalise(rng.normal(size=(30, 8))), np.arange(30), beta=8.0
    )
    config = EvalConfig(num_queries=24, num_negatives=5)
    report = evaluate_sampled(inference, catalogue, item_patches(24), config, querybank=bank)

    # The same draws as the protocol's, then cosine minus the candidate's offset by hand.
    draws = np.random.default_rng(config.seed)
    queries = draw_queries(24, 24, draws)
    sampler = NegativeSampler(catalogue)
    candidates = np.stack([np.append(q, sampler.sample(int(q), draws, 5)) for q in queries])
    groups = group_hashes([item.group for item in catalogue.items])
    texts, images = inference.text_vectors[inference.item_code], inference.image_vectors
    text_offsets, image_offsets = (
        bank.offsets("text", texts, groups)[0],
        bank.offsets("image", images, groups)[0],
    )
    correct = np.zeros(candidates.shape, bool)
    correct[:, 0] = True
    i2t = np.einsum("qce,qe->qc", texts[candidates], images[queries]) - text_offsets[candidates]
    t2i = np.einsum("qe,qce->qc", texts[queries], images[candidates]) - image_offsets[candidates]
    for direction, scores in (("i2t", i2t), ("t2i", t2i)):
        expected = recall_at_k(rank_of_positive(scores, correct), (1, 5))
        assert report[f"sampled/{direction}/R@1"] == pytest.approx(expected["R@1"])
        assert report[f"sampled/{direction}/R@5"] == pytest.approx(expected["R@5"])
    assert report["sampled/querybank_size"] == 30
    assert len(np.concatenate(inference.handed)) == 24 + 2 * 24 * 5 + 24  # true pairs once per direction


def test_evaluate_and_format_table():
    catalogue = make_catalogue()
    inference = FakeInference(catalogue, noise=1.0)
    report = evaluate(
        inference, catalogue, item_patches(24), EvalConfig(num_queries=12, num_negatives=5, recall_k=8)
    )
    assert "sampled/i2t/R@1" in report and "gallery/rerank/t2i/MRR" in report
    table = format_table(report)
    assert "image -> text" in table and "text -> image" in table
    assert "sampled (1 in 6)" in table and "gallery recall 8 + re-rank 8" in table
    sampled_only = evaluate(
        inference, catalogue, item_patches(24), EvalConfig(num_negatives=5), gallery=False
    )
    assert not any(key.startswith("gallery/") for key in sampled_only)
    assert len(format_table(sampled_only).splitlines()) == 6  # header x2, rule, one row, accuracy, timings
    gallery_only = evaluate(
        inference, catalogue, item_patches(24), EvalConfig(num_queries=12, recall_k=8), sampled=False
    )
    assert gallery_only["gallery/rerank/t2i/R@1"] == report["gallery/rerank/t2i/R@1"]
    assert not any(key.startswith("sampled/") for key in gallery_only)


# -- real tiny model ---------------------------------------------------------------------------------------


def test_tiny_real_model_smoke():
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from model.config import DEFAULT_TEXT_MODEL, FashionBertConfig, resolve_text_model
    from model.fashionbert import FashionBert
    from model.inference import FashionBertInference

    torch.manual_seed(0)
    config = FashionBertConfig(
        bert=dict(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
        ),
        patch_feature_dim=32,
        num_patches=16,
        embed_dim=16,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    inference = FashionBertInference(FashionBert(config), tokenizer)
    catalogue = make_catalogue(per_subcategory=5)
    patches = np.random.default_rng(0).normal(size=(len(catalogue), 16, 32)).astype(np.float16)
    report = evaluate(
        inference, catalogue, patches, EvalConfig(num_queries=10, num_negatives=5, recall_k=5, batch_size=16)
    )

    for prefix in ("sampled", "gallery/embedding", "gallery/rerank"):
        for direction in ("i2t", "t2i"):
            recalls = [report[f"{prefix}/{direction}/R@{k}"] for k in (1, 5, 10)]
            assert all(0.0 <= r <= 100.0 for r in recalls) and recalls == sorted(recalls)
            assert 0.0 < report[f"{prefix}/{direction}/MRR"] <= 1.0
    assert 0.0 <= report["sampled/accuracy"] <= 100.0 and 0.0 <= report["sampled/auc"] <= 1.0
    assert report["sampled/i2t/R@10"] == 100.0  # 6 candidates: always within the top 10
    assert all(
        report[key] >= 0.0
        for key in ("sampled/seconds", "gallery/embedding/seconds", "gallery/rerank/seconds")
    )
    assert report["gallery/queries"] == 10 and report["gallery/size"] == 20
