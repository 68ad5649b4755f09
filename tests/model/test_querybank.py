"""Querybank normalisation: offsets against the formula, own-group exclusion, centring, the bank's split."""

from __future__ import annotations

import numpy as np
import pytest

from model.querybank import QueryBank, centred, draw_bank, group_hashes, querybank_offsets


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_offsets_match_the_inverted_softmax_formula() -> None:
    rng = np.random.default_rng(0)
    bank, gallery = _unit(rng, 30), _unit(rng, 12)
    bank_groups, gallery_groups = np.arange(30), np.arange(100, 112)  # no shared group
    beta = 20.0
    expected = np.log(np.exp(beta * bank @ gallery.T).sum(0)) / beta
    got = querybank_offsets(bank, bank_groups, gallery, gallery_groups, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_an_items_own_group_is_left_out_of_its_offset() -> None:
    rng = np.random.default_rng(1)
    bank, gallery = _unit(rng, 6), _unit(rng, 3)
    bank_groups = np.array([0, 0, 1, 2, 3, 4])
    gallery_groups = np.array([0, 5, 6])  # gallery item 0 shares group 0 with bank rows 0 and 1
    beta = 10.0
    got = querybank_offsets(bank, bank_groups, gallery, gallery_groups, beta)
    expected_0 = np.log(np.exp(beta * bank[2:] @ gallery[0]).sum()) / beta
    expected_1 = np.log(np.exp(beta * bank @ gallery[1]).sum()) / beta
    np.testing.assert_allclose(got[:2], [expected_0, expected_1], rtol=1e-5)


def test_an_item_with_no_bank_outside_its_group_is_not_normalised() -> None:
    rng = np.random.default_rng(2)
    bank, gallery = _unit(rng, 2), _unit(rng, 2)
    raw = querybank_offsets(bank, np.array([7, 7]), gallery, np.array([7, 8]), 5.0)
    assert np.isnan(raw[0]) and np.isfinite(raw[1])
    offsets, centre = centred(raw)
    assert offsets[0] == 0.0 and centre == pytest.approx(raw[1])
    empty = querybank_offsets(np.zeros((0, 8), np.float32), np.zeros(0), gallery, np.array([1, 2]), 5.0)
    assert np.isnan(empty).all() and (centred(empty)[0] == 0).all()


def test_centring_keeps_the_ranking_and_a_given_centre_is_reused() -> None:
    raw = np.array([0.9, 0.5, 0.7], np.float32)
    offsets, centre = centred(raw)
    assert centre == pytest.approx(0.7) and offsets.mean() == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(raw - offsets, centre, rtol=1e-6)
    later, same = centred(np.array([0.8], np.float32), centre)
    assert same == centre and later[0] == pytest.approx(0.1)


def test_a_hub_is_pushed_below_a_specific_match() -> None:
    # Gallery image 0 is a hub: close to every bank text. Image 1 matches one kind of text only.
    # A query scores both the same by cosine; normalised, the specific match wins.
    hub = np.array([1.0, 0.0, 0.0], np.float32)
    specific = np.array([0.0, 1.0, 0.0], np.float32)
    bank_texts = np.array([[0.9, 0.1, 0.42], [0.9, -0.1, 0.42], [0.9, 0.0, -0.43], [0.1, 0.3, 0.95]])
    bank_texts = (bank_texts / np.linalg.norm(bank_texts, axis=1, keepdims=True)).astype(np.float32)
    bank = QueryBank(bank_texts, np.zeros_like(bank_texts), np.arange(4), beta=20.0)
    gallery = np.stack([hub, specific])
    offsets, _ = bank.offsets("image", gallery, np.array([10, 11]))
    query = np.array([0.7071, 0.7071, 0.0], np.float32)
    cosine = gallery @ query
    assert cosine[0] == pytest.approx(cosine[1])
    assert (cosine - offsets)[1] > (cosine - offsets)[0]


def test_bank_offsets_read_the_other_modality() -> None:
    rng = np.random.default_rng(3)
    texts, images = _unit(rng, 5), _unit(rng, 5)
    bank = QueryBank(texts, images, np.arange(5), beta=15.0)
    gallery, groups = _unit(rng, 4), np.arange(10, 14)
    image_side, _ = bank.offsets("image", gallery, groups)  # an image gallery, searched by texts
    text_side, _ = bank.offsets("text", gallery, groups)
    np.testing.assert_allclose(
        image_side, centred(querybank_offsets(texts, bank.groups, gallery, groups, 15.0))[0]
    )
    np.testing.assert_allclose(
        text_side, centred(querybank_offsets(images, bank.groups, gallery, groups, 15.0))[0]
    )


def test_a_bank_is_drawn_whole_or_capped() -> None:
    np.testing.assert_array_equal(draw_bank(5, 10), np.arange(5))
    capped = draw_bank(600, 50, seed=1)
    assert len(capped) == 50 and len(set(capped.tolist())) == 50 and np.all(np.diff(capped) > 0)
    np.testing.assert_array_equal(capped, draw_bank(600, 50, seed=1))


def test_group_hashes_are_stable_and_tell_groups_apart() -> None:
    hashes = group_hashes(["a", "b", "a"])
    assert hashes.dtype == np.int64 and hashes[0] == hashes[2] != hashes[1]
    assert group_hashes(["a"])[0] == hashes[0]
