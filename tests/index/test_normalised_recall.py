"""Querybank offsets in bundles: what the build stores, how recall uses them, and items added later."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.build import add_to_bundle, build_bundle, remove_from_bundle
from index.bundle import (
    BANK_GROUPS,
    BANK_IMAGES,
    BANK_TEXTS,
    IMAGE_OFFSETS,
    QUERYBANK_FILES,
    Bundle,
    BundleError,
)
from index.search import normalised_search
from model.querybank import QueryBank, group_hashes
from tests.index.conftest import TEST_CONFIG, StubEncoder, synthetic_catalogue, synthetic_features


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


BANK_FROM = 40  # the normalised bundle holds the slice's first 40 items; the bank is drawn from all 64


@pytest.fixture(scope="module")
def normalised_bundle(
    hm_slice, tiny_inference, slice_features, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The slice's first 40 items, querybank-normalised against a bank drawn from the whole slice."""
    catalogue, _ = hm_slice
    out = tmp_path_factory.mktemp("normalised") / "bundle"
    gallery = catalogue.subset(catalogue.items[:BANK_FROM])
    build_bundle(
        tiny_inference, gallery, slice_features, out, TEST_CONFIG, progress=False, querybank=catalogue
    )
    return out


def _stored_bank(path: Path, beta: float) -> QueryBank:
    return QueryBank(
        np.load(path / BANK_TEXTS), np.load(path / BANK_IMAGES), np.load(path / BANK_GROUPS), beta
    )


def test_build_stores_offsets_against_a_bank_outside_the_gallery(
    normalised_bundle: Path, hm_slice, tiny_inference
) -> None:
    catalogue, features = hm_slice
    items = catalogue.items[:BANK_FROM]
    gallery_groups = {item.group for item in items}
    outside = [item for item in catalogue.items if item.group not in gallery_groups]
    with Bundle.open(normalised_bundle) as bundle:
        section = bundle.manifest["querybank"]
        assert section["beta"] == pytest.approx(tiny_inference.tower_logit_scale)
        assert section["catalogue"]["fingerprint"] == catalogue.fingerprint()
        bank = _stored_bank(normalised_bundle, section["beta"])
        # Every item of another product group, and none of the gallery's.
        assert section["bank_items"] == len(bank.groups) == len(outside) > 0
        np.testing.assert_array_equal(bank.groups, group_hashes([item.group for item in outside]))

        # The stored offsets are the ones the bank gives the bundle's own embeddings.
        images = tiny_inference.encode_images(features[:BANK_FROM])
        texts = tiny_inference.encode_texts([item.text for item in items])
        groups = group_hashes([item.group for item in items])
        np.testing.assert_allclose(bundle.image_offsets, bank.offsets("image", images, groups)[0], atol=2e-3)
        np.testing.assert_allclose(bundle.text_offsets, bank.offsets("text", texts, groups)[0], atol=2e-3)
        assert abs(float(bundle.image_offsets.mean())) < 1e-5

        # Recall ranks text queries by inner product minus the image offset, and returns that score.
        scores, rows = bundle.search_images(texts[:5], k=BANK_FROM)
        expected = texts[:5] @ images.T - bundle.image_offsets[None, :]
        np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=2e-3)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
        assert bundle.manifest["files"].keys() >= set(QUERYBANK_FILES)  # checksummed with the rest


def test_added_items_get_offsets_from_the_stored_bank(
    normalised_bundle: Path, hm_slice, tiny_inference, slice_features, tmp_path: Path
) -> None:
    catalogue, features = hm_slice
    path = tmp_path / "bundle"
    shutil.copytree(normalised_bundle, path)
    with Bundle.open(path) as before:
        old_offsets, section = before.image_offsets.copy(), before.manifest["querybank"]
    add_to_bundle(tiny_inference, path, catalogue, slice_features, progress=False)
    with Bundle.open(path) as bundle:
        assert bundle.manifest["querybank"] == section  # same bank, same centres
        np.testing.assert_array_equal(bundle.image_offsets[:BANK_FROM], old_offsets)
        bank = _stored_bank(path, section["beta"])
        new = catalogue.items[BANK_FROM:]
        images = tiny_inference.encode_images(features[BANK_FROM:])
        expected, _ = bank.offsets(
            "image", images, group_hashes([i.group for i in new]), centre=section["centres"]["image"]
        )
        np.testing.assert_allclose(bundle.image_offsets[BANK_FROM:], expected, atol=2e-3)
        assert bundle.text_offsets.shape == (len(catalogue),)
    remove_from_bundle(path, [catalogue.items[0].id])
    with Bundle.open(path) as bundle:  # removal keeps the offsets (and checks their checksums)
        assert len(bundle.image_offsets) == len(catalogue)
    (path / IMAGE_OFFSETS).unlink()
    with pytest.raises(BundleError, match="image_offsets.npy is missing"):
        Bundle.open(path)


def test_a_bundle_without_querybank_serves_plain_inner_products(tmp_path: Path) -> None:
    encoder, catalogue = StubEncoder(), synthetic_catalogue(40)
    build_bundle(encoder, catalogue, synthetic_features(), tmp_path / "plain", TEST_CONFIG, progress=False)
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


def test_a_bank_inside_the_gallery_is_refused(tmp_path: Path) -> None:
    encoder, catalogue = StubEncoder(), synthetic_catalogue(20)
    with pytest.raises(BundleError, match="no item outside the gallery's product groups"):
        build_bundle(
            encoder,
            catalogue,
            synthetic_features(),
            tmp_path / "b",
            TEST_CONFIG,
            progress=False,
            querybank=catalogue,
        )
    assert not (tmp_path / "b").exists()
