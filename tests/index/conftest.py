"""Fixtures for the index jobs: the tiny model over the real H&M slice, and a numpy stand-in for speed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from index.build import PatchFeatureSource, build_bundle
from index.config import IndexConfig
from model.catalogue import Catalogue, Item

# One OpenMP thread: on a shared 2-core runner, faiss' spinning worker threads make k-means 10x slower.
faiss.omp_set_num_threads(1)

# Small enough for a quick PQ64 codec (16 items x 64 patches), real enough to exercise every path.
TEST_CONFIG = IndexConfig(codec_train_items=16, chunk_items=32)
BASE_ITEMS = 48  # the base bundle holds the first 48 items of the 64-item slice; the rest are for `add`


class StubEncoder:
    """Numpy stand-in for FashionBertInference: image embedding = a fixed projection of the mean patch,
    text embedding = a hashed bag of word ids. Deterministic, and no torch import (subprocess tests)."""

    def __init__(
        self, embed_dim: int = 16, num_patches: int = 4, patch_feature_dim: int = 32, patch_pool: int = 1
    ) -> None:
        self.config = SimpleNamespace(
            embed_dim=embed_dim,
            num_patches=num_patches,
            patch_pool=patch_pool,
            encoder_patches=num_patches // patch_pool**2,
            patch_feature_dim=patch_feature_dim,
            max_text_len=12,
            patch_features={"stub": True},
            bert={"vocab_size": 1000},
        )
        self.fingerprint = "stub-model-0123456789abcdef"
        self.tower_logit_scale = 20.0
        self.projection = (
            np.random.default_rng(0).standard_normal((patch_feature_dim, embed_dim)).astype(np.float32)
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [
            [101, *(sum(map(ord, word)) % 997 + 2 for word in text.split())][:11] + [102] for text in texts
        ]

    def encode_token_ids(self, token_ids, batch_size: int = 0) -> np.ndarray:
        out = np.zeros((len(token_ids), self.config.embed_dim), np.float32)
        for row, ids in enumerate(token_ids):
            for token in ids:
                out[row, token % self.config.embed_dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def encode_images(self, patch_features: np.ndarray, batch_size: int = 0) -> np.ndarray:
        out = patch_features.astype(np.float32).mean(1) @ self.projection
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def synthetic_catalogue(n: int, start: int = 0, categories: int = 5) -> Catalogue:
    items = [
        Item(
            id=f"item-{i:06d}",
            text=f"product {i} in colour {i % 7} style {i % 11}",
            title=f"product {i}",
            image=f"/nonexistent/{i}.jpg",
            category=f"cat{i % categories}",
            subcategory=f"sub{i % (2 * categories)}",
            group=f"g{i // 2}",
            metadata={"colour": str(i % 7)},
        )
        for i in range(start, start + n)
    ]
    return Catalogue("jsonl", "synthetic", items)


def synthetic_features(
    num_patches: int = 4, dim: int = 32, unreadable: frozenset[str] = frozenset()
) -> PatchFeatureSource:
    """Patch features seeded by item number, clustered by category; ids in `unreadable` are skipped."""

    def source(catalogue: Catalogue) -> tuple[Catalogue, np.ndarray]:
        kept = [item for item in catalogue.items if item.id not in unreadable]
        features = np.empty((len(kept), num_patches, dim), np.float16)
        for row, item in enumerate(kept):
            number = int(item.id.split("-")[1])
            centre = np.random.default_rng(int(item.category[3:])).standard_normal(dim)
            noise = np.random.default_rng(number + 1000).standard_normal((num_patches, dim))
            features[row] = np.abs(centre + noise)
        return catalogue.subset(kept), features

    return source


@pytest.fixture(scope="session")
def tiny_inference(tiny_checkpoint: Path):
    from model.inference import FashionBertInference

    return FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def base_bundle(
    hm_slice, tiny_inference, slice_features: PatchFeatureSource, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A bundle of the first 48 slice items, built once; tests that change it work on a copy."""
    catalogue, _ = hm_slice
    out = tmp_path_factory.mktemp("bundles") / "base"
    build_bundle(
        tiny_inference,
        catalogue.subset(catalogue.items[:BASE_ITEMS]),
        slice_features,
        out,
        TEST_CONFIG,
        progress=False,
    )
    return out


@pytest.fixture
def bundle_copy(base_bundle: Path, tmp_path: Path) -> Callable[[], Path]:
    def copy() -> Path:
        target = tmp_path / "bundle"
        shutil.copytree(base_bundle, target)
        return target

    return copy
