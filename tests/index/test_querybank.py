"""Querybank offsets in bundles: what the build stores, how recall uses them, and items added later."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.build import add_to_bundle, build_bundle, remove_from_bundle
from index.bundle import BANK_GROUPS, BANK_IMAGES, BANK_TEXTS, QUERYBANK_FILES, Bundle
from index.config import IndexConfig
from index.search import normalised_search
from model.catalogue import in_validation
from model.querybank import QueryBank, group_hashes
from tests.index.conftest import BASE_ITEMS, TEST_CONFIG, StubEncoder, synthetic_catalogue, synthetic_features


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("filtered", [False, True])
def test_normalised_search_is_the_exact_top_k_of_score_minus_offset(filtered: bool) -> None:
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng, 500), _unit(rng, 7)
    offsets = (0.3 * rng.standard_normal(500)).astype(np.float32)  # wide: forces deeper searches
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    allowed = rng.random(500) < 0.3 if filtered else np.ones(500, bool)
    scores, rows = normalised_search(index, queries, 10, offsets, allowed if filtered else None)
    brute = queries @ vectors.T - offsets[None, :]
    brute[:, ~allowed] = -np.inf
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, axis=1), rtol=1e-5)


def test_normalised_search_pads_a_small_catalogue() -> None:
    rng = np.random.default_rng(1)
    index = faiss.IndexFlatIP(16)
    index.add(_unit(rng, 3))
    scores, rows = normalised_search(index, _unit(rng, 2), 5, np.zeros(3, np.float32))
    assert (rows[:, :3] >= 0).all() and (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_build_stores_offsets_of_a_bank_without_held_out_items(
    base_bundle: Path, hm_slice, tiny_inference
) -> None:
    catalogue, features = hm_slice
    items = catalogue.items[:BASE_ITEMS]
    with Bundle.open(base_bundle) as bundle:
        section = bundle.manifest["querybank"]
        assert section["beta"] == pytest.approx(tiny_inference.tower_logit_scale)
        bank_groups = np.load(base_bundle / BANK_GROUPS)
        train = [item for item in items if not in_validation(item.group)]
        assert section["bank_items"] == len(bank_groups) == len(train) < len(items)  # some held out
        np.testing.assert_array_equal(bank_groups, group_hashes([item.group for item in train]))

        # The stored offsets are the ones the bank gives the bundle's own embeddings.
        bank = QueryBank(
            np.load(base_bundle / BANK_TEXTS),
            np.load(base_bundle / BANK_IMAGES),
            bank_groups,
            section["beta"],
        )
        images = tiny_inference.encode_images(features[:BASE_ITEMS])
        texts = tiny_inference.encode_texts([item.text for item in items])
        groups = group_hashes([item.group for item in items])
        np.testing.assert_allclose(bundle.image_offsets, bank.offsets("image", images, groups)[0], atol=2e-3)
        np.testing.assert_allclose(bundle.text_offsets, bank.offsets("text", texts, groups)[0], atol=2e-3)
        assert abs(float(bundle.image_offsets.mean())) < 1e-5

        # Recall ranks text queries by inner product minus the image offset, and returns that score.
        scores, rows = bundle.search_images(texts[:5], k=BASE_ITEMS)
        expected = texts[:5] @ images.T - bundle.image_offsets[None, :]
        np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=2e-3)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_added_items_get_offsets_from_the_stored_bank(
    bundle_copy: Callable[[], Path], hm_slice, tiny_inference, slice_features
) -> None:
    catalogue, features = hm_slice
    path = bundle_copy()
    with Bundle.open(path) as before:
        old_offsets, section = before.image_offsets.copy(), before.manifest["querybank"]
    add_to_bundle(tiny_inference, path, catalogue, slice_features, progress=False)
    with Bundle.open(path) as bundle:
        assert bundle.manifest["querybank"] == section  # same bank, same centres
        np.testing.assert_array_equal(bundle.image_offsets[:BASE_ITEMS], old_offsets)
        bank = QueryBank(
            np.load(path / BANK_TEXTS),
            np.load(path / BANK_IMAGES),
            np.load(path / BANK_GROUPS),
            section["beta"],
        )
        new = catalogue.items[BASE_ITEMS:]
        images = tiny_inference.encode_images(features[BASE_ITEMS:])
        expected, _ = bank.offsets(
            "image", images, group_hashes([i.group for i in new]), centre=section["centres"]["image"]
        )
        np.testing.assert_allclose(bundle.image_offsets[BASE_ITEMS:], expected, atol=2e-3)
        assert bundle.text_offsets.shape == (len(catalogue),)
    remove_from_bundle(path, [catalogue.items[0].id])
    with Bundle.open(path) as bundle:  # removal keeps the offsets (and checks their checksums)
        assert len(bundle.image_offsets) == len(catalogue)


def test_a_bundle_without_querybank_serves_plain_inner_products(tmp_path: Path) -> None:
    encoder, catalogue = StubEncoder(), synthetic_catalogue(40)
    config = IndexConfig(**{**TEST_CONFIG.to_dict(), "querybank": False})
    build_bundle(encoder, catalogue, synthetic_features(), tmp_path / "plain", config, progress=False)
    assert not any((tmp_path / "plain" / name).exists() for name in QUERYBANK_FILES)
    with Bundle.open(tmp_path / "plain") as bundle:
        assert "querybank" not in bundle.manifest and bundle.image_offsets is None
        query = encoder.encode_token_ids(encoder.tokenize([catalogue.items[3].text]))
        scores, rows = bundle.search_images(query, k=5)
        raw_scores, raw_rows = bundle.image_index.search(query, 5)
        np.testing.assert_array_equal(rows, raw_rows)
        np.testing.assert_allclose(scores, raw_scores)
    # Adding to it keeps it plain.
    add_to_bundle(encoder, tmp_path / "plain", synthetic_catalogue(4, start=40), synthetic_features(), False)
    with Bundle.open(tmp_path / "plain") as bundle:
        assert bundle.image_offsets is None and bundle.size == 44


def test_a_bundle_missing_a_querybank_file_is_refused(bundle_copy: Callable[[], Path]) -> None:
    from index.bundle import IMAGE_OFFSETS, BundleError

    path = bundle_copy()
    (path / IMAGE_OFFSETS).unlink()
    with pytest.raises(BundleError, match="image_offsets.npy is missing"):
        Bundle.open(path)
