"""A bundle built from real H&M items with the tiny model reads back whole, and damaged ones are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.bundle import (
    FILES,
    FORMAT_VERSION,
    MANIFEST,
    PATCH_CODES,
    PATCH_FILES,
    TEXT_INDEX,
    Bundle,
    BundleError,
)
from model.patches import pool_grid
from tests.index.conftest import BASE_ITEMS


def test_build_writes_a_verified_manifest(base_bundle: Path, tiny_inference) -> None:
    with Bundle.open(base_bundle, expected_model_fingerprint=tiny_inference.fingerprint) as bundle:
        manifest = bundle.manifest
        assert manifest["format_version"] == FORMAT_VERSION
        assert manifest["model"]["fingerprint"] == tiny_inference.fingerprint
        assert manifest["model"]["embed_dim"] == 32 and manifest["model"]["num_patches"] == 64
        assert manifest["indexes"]["factory"] == "Flat"  # 48 items: exact search
        assert manifest["counts"] == {
            "rows": BASE_ITEMS,
            "live": BASE_ITEMS,
            "removed": 0,
            "skipped_unreadable": 0,
        }
        assert set(manifest["files"]) == set(FILES + PATCH_FILES)
        assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
        assert manifest["catalogues"][0]["fingerprint"]
        # The 8 x 8 grid is stored pooled 2 x 2, as the encoder reads it; PQ64: 64 bytes a patch.
        assert manifest["patch_codec"]["patches_per_item"] == 16
        assert manifest["patch_codec"]["bytes_per_item"] == 16 * 64
        assert bundle.size == BASE_ITEMS
    assert not list(base_bundle.parent.glob(".base.staging-*")), "the staging folder was not cleaned up"


def test_metadata_tokens_and_patches_round_trip(base_bundle: Path, hm_slice, tiny_inference) -> None:
    catalogue, features = hm_slice
    with Bundle.open(base_bundle) as bundle:
        rows = np.arange(BASE_ITEMS)
        for item, stored in zip(catalogue.items[:BASE_ITEMS], bundle.items(rows), strict=True):
            assert stored["id"] == item.id and stored["title"] == item.title and stored["text"] == item.text
            assert (stored["category"], stored["subcategory"], stored["group"]) == (
                item.category,
                item.subcategory,
                item.group,
            )
            assert stored["image"] == item.image and stored["metadata"] == dict(item.metadata)
        item = catalogue.items[5]
        assert bundle.row_of(item.id) == 5 and bundle.item(item.id)["title"] == item.title
        assert bundle.row_of("no-such-id") is None and bundle.item("no-such-id") is None
        assert bundle.image_path(item.id) == Path(item.image)
        assert bundle.items([7, 2])[0]["row"] == 7  # in the order asked
        assert bundle.token_ids([3, 4]) == tiny_inference.tokenize(
            [catalogue.items[3].text, catalogue.items[4].text]
        )

        decoded = bundle.patch_features([0, 1, 2])
        assert decoded.shape == (3, 16, 1536) and decoded.dtype == np.float32  # CNN 1280 + colour 256
        original = pool_grid(features[:3], 2).astype(np.float32)
        relative = ((decoded - original) ** 2).sum() / (original**2).sum()
        assert relative < 0.25, f"PQ codes lost {relative:.0%} of the patch signal"
        with pytest.raises(IndexError):
            bundle.patch_features([-1])


def test_search_finds_each_item_by_its_own_embeddings(base_bundle: Path, hm_slice, tiny_inference) -> None:
    catalogue, features = hm_slice
    with Bundle.open(base_bundle) as bundle:
        image_queries = tiny_inference.encode_images(features[:10])
        scores, rows = bundle.search_texts(image_queries, k=5)  # image query -> text index
        assert rows.shape == (10, 5) and scores.dtype == np.float32
        text_queries = tiny_inference.encode_texts([item.text for item in catalogue.items[:10]])
        scores, rows = bundle.search_images(tiny_inference.encode_images(features[:10]), k=1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(10))  # own image embedding, exact index
        assert np.all(scores[:, 0] > 0.99)
        _, rows = bundle.search_texts(text_queries, k=1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(10))
        _, rows = bundle.search_images(image_queries[:1], k=100)  # more than the bundle holds
        assert (rows[0] >= 0).sum() == BASE_ITEMS and np.all(rows[0, BASE_ITEMS:] == -1)


def test_category_filter(base_bundle: Path, hm_slice, tiny_inference) -> None:
    catalogue, features = hm_slice
    category = catalogue.items[0].category
    expected = [row for row, item in enumerate(catalogue.items[:BASE_ITEMS]) if item.category == category]
    with Bundle.open(base_bundle) as bundle:
        rows = bundle.rows_matching({"category": category})
        assert rows.tolist() == expected
        _, found = bundle.search_images(tiny_inference.encode_images(features[:3]), k=BASE_ITEMS, rows=rows)
        assert set(found[found >= 0].tolist()) == set(expected)
        colour = catalogue.items[0].metadata["colour_group_name"]
        by_colour = bundle.rows_matching({"metadata.colour_group_name": colour, "category": category})
        assert 0 in by_colour.tolist()
        assert len(bundle.rows_matching({"category": ["no-such", category]})) == len(expected)
        with pytest.raises(ValueError, match="cannot filter"):
            bundle.rows_matching({"price; DROP TABLE items": "1"})


def test_refuses_another_model(base_bundle: Path) -> None:
    with pytest.raises(BundleError, match="another space|rebuild"):
        Bundle.open(base_bundle, expected_model_fingerprint="0" * 64)


@pytest.mark.parametrize("name", [PATCH_CODES, TEXT_INDEX, "items.sqlite"])
def test_refuses_a_flipped_byte(bundle_copy: Callable[[], Path], name: str) -> None:
    path = bundle_copy()
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(path)


def test_refuses_a_truncated_file(bundle_copy: Callable[[], Path]) -> None:
    path = bundle_copy()
    data = (path / TEXT_INDEX).read_bytes()
    (path / TEXT_INDEX).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(path, verify_checksums=False)  # sizes are checked even without hashing


def test_refuses_another_format_version_and_broken_manifests(
    bundle_copy: Callable[[], Path], tmp_path: Path
) -> None:
    path = bundle_copy()
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="format version"):
        Bundle.open(path)
    (path / MANIFEST).write_text("{ not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle.open(path)
    (path / MANIFEST).unlink()
    with pytest.raises(BundleError, match="did not finish"):
        Bundle.open(path)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "missing")


def test_refuses_a_missing_file(bundle_copy: Callable[[], Path]) -> None:
    path = bundle_copy()
    (path / PATCH_CODES).unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(path)
