"""Index choice by catalogue size, IVF-PQ against exact search, filtered search and the GPU fallback."""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import pytest

import index.factory
from index.build import build_bundle
from index.bundle import Bundle
from index.config import IndexConfig
from index.factory import (
    add_vectors,
    build_index,
    choose_factory,
    choose_nlist,
    new_index,
    sub_indexes,
    train_index,
)
from index.search import filtered_search
from tests.index.conftest import TEST_CONFIG, StubEncoder, synthetic_catalogue, synthetic_features


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def overlap_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("n", [1_000, 10_000, 50_000, 1_000_000, 30_000_000])
def test_nlist_is_in_the_usual_range_with_enough_training_points(n: int) -> None:
    nlist = choose_nlist(n)
    assert nlist & (nlist - 1) == 0, "a power of two"
    assert nlist * 39 <= n, "faiss wants 39 training points per list"
    if n >= 50_000:
        assert 4 * math.sqrt(n) <= nlist <= 8 * math.sqrt(n)


def test_auto_factory_by_catalogue_size() -> None:
    config = IndexConfig()
    assert choose_factory(10, 256, config) == "Flat"
    assert choose_factory(9_999, 256, config) == "Flat"
    assert choose_factory(50_000, 256, config) == "OPQ64,IVF1024,PQ64,Refine(SQ8)"
    assert choose_factory(50_000, 256, IndexConfig(refine="Flat")) == "OPQ64,IVF1024,PQ64,RFlat"
    assert choose_factory(50_000, 256, IndexConfig(refine="", pq_bytes=32)) == "OPQ32,IVF1024,PQ32"
    # Too few points for a useful inverted file, enough for PQ codebooks: PQ only.
    assert choose_factory(1_000, 32, IndexConfig(exact_below=0)) == "OPQ8,PQ8,Refine(SQ8)"
    assert choose_factory(100, 32, IndexConfig(exact_below=0)) == "Flat"  # too few even for PQ
    assert choose_factory(50_000, 256, IndexConfig(factory="IVF{nlist},Flat")) == "IVF1024,Flat"
    with pytest.raises(AssertionError, match="divide"):
        choose_factory(50_000, 250, IndexConfig(pq_bytes=64))


def test_small_catalogue_builds_a_flat_bundle(tmp_path: Path) -> None:
    build_bundle(
        StubEncoder(),
        synthetic_catalogue(10),
        synthetic_features(),
        tmp_path / "b",
        TEST_CONFIG,
        progress=False,
    )
    with Bundle.open(tmp_path / "b") as bundle:
        assert bundle.manifest["indexes"]["factory"] == "Flat" and bundle.size == 10


def test_ivfpq_recall_against_exact_inner_product() -> None:
    base, queries, k = clustered(6_000, 32, seed=0), clustered(200, 32, seed=1), 20
    exact = faiss.IndexFlatIP(32)
    exact.add(base)
    _, truth = exact.search(queries, k)
    chance = k / len(base)

    plain, factory, _ = build_index(base, IndexConfig(exact_below=0, refine="", nprobe=16))
    assert factory.startswith("OPQ8,IVF128,PQ8")
    ivfpq = next(sub for sub in sub_indexes(plain) if isinstance(sub, faiss.IndexIVFPQ))
    assert ivfpq.pq.cp.niter == IndexConfig().pq_iterations  # the recall below is with 10 k-means rounds
    refined, _, _ = build_index(base, IndexConfig(exact_below=0, refine="SQ8", nprobe=16))
    _, approx = filtered_search(plain, queries, k)
    _, approx_refined = filtered_search(refined, queries, k)
    recall, recall_refined = overlap_at_k(approx, truth), overlap_at_k(approx_refined, truth)
    assert recall > 100 * chance and recall > 0.5, recall
    assert recall_refined > 0.85 and recall_refined > recall, (recall, recall_refined)
    _, deeper = filtered_search(refined, queries, k, nprobe=64)
    assert overlap_at_k(deeper, truth) >= recall_refined - 0.01  # more lists visited never hurts much


@pytest.mark.parametrize("factory", ["IVF64,PQ8,Refine(SQ8)", "OPQ8,PQ8", "Flat"])
def test_filtered_search_returns_only_allowed_rows(factory: str) -> None:
    base, queries = clustered(4_000, 32, seed=2), clustered(20, 32, seed=3)
    config = IndexConfig(factory=factory)
    index = new_index(factory, 32, config)
    train_index(index, base, config)
    index = add_vectors(index, base)
    allowed = np.zeros(len(base), dtype=bool)
    allowed[::7] = True  # a "category" of one row in seven
    scores, rows = filtered_search(index, queries, 10, allowed=allowed)
    assert np.all(rows >= 0) and np.all(allowed[rows]), "every query fills k with allowed rows only"
    assert np.all(np.diff(scores, axis=1) <= 1e-5), "best first"
    exact = faiss.IndexFlatIP(32)
    exact.add(base[allowed])
    _, truth = exact.search(queries, 10)
    assert overlap_at_k(rows, np.flatnonzero(allowed)[truth]) > 0.6
    none = np.zeros(len(base), dtype=bool)
    assert np.all(filtered_search(index, queries, 5, allowed=none)[1] == -1)


def test_gpu_failure_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gpu(*args, **kwargs):
        raise RuntimeError("CUDA error: no device")

    monkeypatch.setattr(index.factory, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_gpu, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: type("Options", (), {})(), raising=False)
    base = clustered(3_000, 16, seed=4)
    built, factory, _ = build_index(base, IndexConfig(factory="IVF32,Flat"))
    assert built.ntotal == 3_000 and built.is_trained and factory == "IVF32,Flat"


def test_cross_modal_queries_across_a_modality_gap() -> None:
    """Text and image embeddings of one item agree but sit in two cones (the modality gap): text queries
    into the image index must still find their items, so each index trains on its own modality."""
    items = clustered(6_000, 32, seed=5)
    gap = np.zeros(32, np.float32)
    gap[0] = 1.5
    images = items + gap
    texts = items - gap + 0.1 * np.random.default_rng(6).standard_normal(items.shape).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    index, factory, _ = build_index(images, IndexConfig(exact_below=0))
    assert "IVF" in factory
    _, found = filtered_search(index, texts[:200], 10)
    assert np.all(found >= 0), "every text query fills its k image results"
    exact = faiss.IndexFlatIP(32)
    exact.add(images)
    _, truth = exact.search(texts[:200], 10)
    assert overlap_at_k(found, truth) > 0.8
