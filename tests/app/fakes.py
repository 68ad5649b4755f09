"""Small stand-ins for the model and the bundle, with the same methods, for tests of the HTTP layer.

The fake model embeds text as a hashed bag of words and an image as the mean of its patches; the fake
bundle stores each item's image as patches equal to its text embedding, so an item's own text recalls it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.pair_states import PairStates

EMBED_DIM = 16
NUM_PATCHES = 4
MAX_TEXT_LEN = 12


def _word_id(word: str) -> int:
    return 1000 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:2], "big")


class FakeInference:
    fingerprint = "fake-model-fingerprint-0123456789"
    precision = "fp32"  # numpy float32 throughout

    def __init__(self) -> None:
        self.match_calls: list[int] = []  # pairs per call, to check micro-batching

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [
            [101, *[_word_id(w) for w in text.lower().split()][: MAX_TEXT_LEN - 2], 102] for text in texts
        ]

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 256) -> np.ndarray:
        out = np.zeros((len(token_ids), EMBED_DIM), np.float32)
        for row, ids in enumerate(token_ids):
            for token in ids[1:-1]:
                out[row, token % EMBED_DIM] += 1.0
        return _normalise(out)

    def encode_images(self, patch_features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return _normalise(np.asarray(patch_features, np.float32).mean(axis=1))

    def pool_patches(self, patch_features: np.ndarray) -> np.ndarray:
        return patch_features  # fake bundles store the extractor's grid as it is

    def match(
        self,
        token_ids: Sequence[Sequence[int]],
        patch_features: np.ndarray,
        batch_size: int = 128,
        tower_similarity: np.ndarray | None = None,
    ) -> np.ndarray:
        assert len(token_ids) == len(patch_features)
        self.match_calls.append(len(token_ids))
        if tower_similarity is None:
            text = self.encode_token_ids(token_ids)
            image = self.encode_images(patch_features)
            tower_similarity = (text * image).sum(axis=1)
        return (10.0 * np.asarray(tower_similarity)).astype(np.float32)

    # A fused model's halves: the fake's logit reads the tower term alone, so the states only carry shape.
    def text_states(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        length = max((len(ids) for ids in token_ids), default=0)
        mask = np.array([[i < len(ids) for i in range(length)] for ids in token_ids], bool)
        return np.zeros((len(token_ids), length, 1), np.float16), mask.reshape(len(token_ids), length)

    def image_states(self, patch_features: np.ndarray) -> np.ndarray:
        return np.zeros((len(patch_features), NUM_PATCHES, 1), np.float16)

    def score_states(self, pairs: PairStates) -> np.ndarray:
        assert len(pairs.text) == len(pairs.text_mask) == len(pairs.image) == len(pairs)
        self.match_calls.append(len(pairs))
        return (10.0 * np.asarray(pairs.tower_similarity)).astype(np.float32)


class FakeExtractor:
    """An image's patches: its mean colour spread over the first three dimensions."""

    def extract(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), NUM_PATCHES, EMBED_DIM), np.float32)
        for i, image in enumerate(images):
            out[i, :, :3] = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0) / 255.0 + 0.01
        return out


class FakeBundle:
    def __init__(self, items: list[dict[str, Any]], version: str = "fake-1") -> None:
        self._items = items
        self._rows = {item["id"]: row for row, item in enumerate(items)}
        self.manifest = {"version": version}
        model = FakeInference()
        self._token_ids = model.tokenize([item["text"] for item in items])
        self._embeddings = model.encode_token_ids(self._token_ids)  # text and image share a space here
        self.size = len(items)
        self.stores_states = False

    def _search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self._embeddings.T
        if rows is not None:  # like the real bundle: only these rows may come back
            mask = np.full(len(self._items), -np.inf, np.float32)
            mask[rows] = 0.0
            scores = scores + mask
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1)
        order[~np.isfinite(top)] = -1
        pad = k - order.shape[1]
        return (
            np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
            np.pad(order, ((0, 0), (0, pad)), constant_values=-1),
        )

    search_images = _search
    search_texts = _search

    def patch_features(self, rows: np.ndarray) -> np.ndarray:
        return np.repeat(self._embeddings[np.asarray(rows)][:, None, :], NUM_PATCHES, axis=1)

    def token_ids(self, rows: np.ndarray) -> list[list[int]]:
        return [self._token_ids[row] for row in rows]

    def items(self, rows: np.ndarray) -> list[dict[str, Any]]:
        return [dict(self._items[row]) for row in rows]

    def item(self, item_id: str) -> dict[str, Any] | None:
        row = self._rows.get(item_id)
        return None if row is None else dict(self._items[row])

    def rows_matching(self, filters: dict[str, str]) -> np.ndarray:
        def value(item: dict[str, Any], key: str) -> Any:
            if key in ("category", "subcategory", "group"):
                return item.get(key)
            if key.startswith("metadata."):
                return item["metadata"].get(key.removeprefix("metadata."))
            raise ValueError(f"cannot filter on {key!r}")

        rows = [
            row
            for row, item in enumerate(self._items)
            if all(value(item, f) == v for f, v in filters.items())
        ]
        return np.asarray(rows, np.int64)

    def image_path(self, item_id: str) -> Path | None:
        item = self.item(item_id)
        return Path(item["image"]) if item is not None else None


CATEGORIES = ("Garment Upper body", "Garment Lower body", "Shoes")
COLOURS = ("red", "blue", "green", "black", "white")


def make_items(image_dir: Path, count: int = 30) -> list[dict[str, Any]]:
    """Items with distinct texts, three categories and a small PNG each."""
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        colour, category = COLOURS[i % len(COLOURS)], CATEGORIES[i % len(CATEGORIES)]
        path = image_dir / f"{i:04d}.png"
        Image.new("RGB", (8, 8), (i * 8, 100, 200)).save(path)
        items.append(
            {
                "id": f"{i:010d}",
                "title": f"{colour} item {i}",
                "text": f"{colour} {category.lower()} number{i} style{i % 7}",
                "category": category,
                "subcategory": f"type{i % 4}",
                "image": str(path),
                "metadata": {"colour": colour},
            }
        )
    return items


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
