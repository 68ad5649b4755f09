"""Recall of the approximate recall indexes against exact inner-product search on the same vectors.

    python benchmarks/index_recall.py                          # synthetic clustered vectors, 50k x 256
    python benchmarks/index_recall.py --vectors patches        # real H&M image features (needs the cache)
    python benchmarks/index_recall.py --model RUN/best --data hm:../shared/data/hm   # real embeddings

recall@K = |approximate top-K  &  exact top-K| / K, averaged over queries (what the re-ranker loses);
NN-in-top-K = share of queries whose exact nearest neighbour is in the approximate top-K (faiss' 1-R@K).
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

import faiss
import numpy as np
from index_common import machine, print_table  # also puts the repo on sys.path

from index.config import IndexConfig
from index.factory import build_index
from index.search import filtered_search


def normalise(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def synthetic(n: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Sub-categories -> products -> colour variants, queries a noisy copy of an item (the modality gap)."""
    rng = np.random.default_rng(seed)
    unit = 1 / np.sqrt(dim)
    centres = rng.standard_normal((200, dim)) * unit
    products = centres[rng.integers(0, 200, n // 4)] + 0.7 * unit * rng.standard_normal((n // 4, dim))
    items = products[rng.integers(0, n // 4, n)] + 0.35 * unit * rng.standard_normal((n, dim))
    picked = items[rng.integers(0, n, queries)]
    query = picked + 0.5 * unit * rng.standard_normal((queries, dim))
    return normalise(items), normalise(query), f"synthetic: 200 sub-categories, {n // 4} products, {n} items"


def patch_vectors(spec: str, cache_root: str, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Mean-pooled EfficientNet patch features of a real catalogue, PCA'd to `dim`: real image structure."""
    from model.catalogue import load_catalogue
    from model.feature_cache import FeatureCache
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    catalogue = load_catalogue(spec)
    cache = FeatureCache(cache_root, PatchFeatureExtractor(PatchFeatureConfig()))
    _, features = cache.features_for(catalogue, progress=False)
    pooled = np.ascontiguousarray(features.astype(np.float32).mean(1))
    pca = faiss.PCAMatrix(pooled.shape[1], dim)
    pca.train(pooled)
    vectors = normalise(pca.apply(pooled))
    order = np.random.default_rng(0).permutation(len(vectors))
    held_out = order[:queries]  # queries are items not in the index
    return vectors[order[queries:]], vectors[held_out], f"{spec}: mean-pooled patch features, PCA {dim}"


def model_vectors(model: str, specs: list[str], cache_root: str, limit: int | None, queries: int):
    """Image embeddings of the catalogue as the index, text embeddings of some items as the queries."""
    from model.catalogue import load_catalogue
    from model.feature_cache import FeatureCache
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    inference = FashionBertInference.from_checkpoint(model)
    cache = FeatureCache(
        cache_root, PatchFeatureExtractor(PatchFeatureConfig.from_dict(inference.config.patch_features))
    )
    images, texts = [], []
    for spec in specs:
        kept, features = cache.features_for(load_catalogue(spec, limit=limit), progress=False)
        images.append(inference.encode_images(features))
        texts.append(inference.encode_texts([item.text for item in kept.items]))
    images, texts = np.concatenate(images), np.concatenate(texts)
    pick = np.random.default_rng(0).choice(len(texts), min(queries, len(texts)), replace=False)
    return normalise(images), normalise(texts[pick]), f"{model}: image index, text queries"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", choices=["synthetic", "patches"], default="synthetic")
    parser.add_argument("--model", default=None, help="trained checkpoint: use its real embeddings")
    parser.add_argument("--data", action="append", default=None)
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--n", type=int, default=50_000, help="synthetic items")
    parser.add_argument(
        "--dim", type=int, default=256, help="synthetic / PCA dimension (the model's embed_dim)"
    )
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--nprobe", default="8,16,32,64,128,256")
    parser.add_argument("--refine", default="none,SQ8", help="comma list of refine settings (none = off)")
    parser.add_argument("--factory", default="auto", help="faiss factory string; auto = the bundle's choice")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.model:
        base, queries, what = model_vectors(
            args.model, args.data or ["hm:../shared/data/hm"], args.cache, args.limit, args.queries
        )
    elif args.vectors == "patches":
        base, queries, what = patch_vectors(
            (args.data or ["hm:../shared/data/hm"])[0], args.cache, args.queries, args.dim
        )
    else:
        base, queries, what = synthetic(args.n, args.queries, args.dim)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    started = time.perf_counter()
    truth_scores, truth = exact.search(queries, args.k)
    exact_ms = 1000 * (time.perf_counter() - started) / len(queries)

    rows = []
    for refine in args.refine.split(","):
        config = IndexConfig(factory=args.factory, exact_below=0, refine="" if refine == "none" else refine)
        started = time.perf_counter()
        index, factory, _ = build_index(base, config)
        build_s = time.perf_counter() - started
        for nprobe in map(int, args.nprobe.split(",")):
            search = functools.partial(filtered_search, index, queries, args.k, nprobe=nprobe)
            search()  # warm-up
            started = time.perf_counter()
            _, found = search()
            ms = 1000 * (time.perf_counter() - started) / len(queries)
            recall = np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth, strict=True)])
            nn = np.mean([t[0] in f for f, t in zip(found, truth, strict=True)])
            rows.append(
                {
                    "factory": factory,
                    "nprobe": nprobe,
                    f"recall@{args.k}": float(recall),
                    f"NN-in-top-{args.k}": float(nn),
                    "ms/query": ms,
                    "build s": build_s,
                }
            )

    print(f"machine: {machine()}")
    print(f"vectors: {what}; {len(base):,} x {base.shape[1]}, {len(queries)} queries")
    print(
        f"exact IndexFlatIP: {exact_ms:.2f} ms/query; mean similarity of the true top-1 "
        f"{truth_scores[:, 0].mean():.3f}, of the true #{args.k} {truth_scores[:, -1].mean():.3f}"
    )
    print_table(rows, f"approximate vs exact top-{args.k} (default nprobe {IndexConfig().nprobe})")


if __name__ == "__main__":
    main()
