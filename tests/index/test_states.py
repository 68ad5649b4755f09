"""Bundles of a model with a fusion layer store every item's side states below it (as codes, or float16;
text states ragged, or padded as before stop 34), built and added alike, and re-ranking from them scores
what the model scores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from index.build import add_to_bundle, build_bundle
from index.bundle import MANIFEST, PATCH_FILES, STATE_CODEC_FILES, STATE_FILES, Bundle
from model.pair_states import PairStates
from tests.index.conftest import TEST_CONFIG


@pytest.fixture(scope="module")
def fused_inference(fused_checkpoint: Path):
    from model.inference import FashionBertInference

    return FashionBertInference.from_checkpoint(fused_checkpoint, device="cpu")


def _build_and_add(inference, hm_slice, slice_features, tmp_path: Path, states_codec: str, layout: str):
    """A fused bundle of 20 slice items plus 8 added: (its folder, the slice's patch features)."""
    catalogue, features = hm_slice
    out = tmp_path / "fused"
    config = dataclasses.replace(TEST_CONFIG, states_codec=states_codec, text_states_layout=layout)
    build_bundle(
        inference, catalogue.subset(catalogue.items[:20]), slice_features, out, config, progress=False
    )
    add_to_bundle(inference, out, catalogue.subset(catalogue.items[20:28]), slice_features, progress=False)
    return out, features


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_float16_states_are_stored_for_built_and_added_items(
    hm_slice, fused_inference, slice_features, tmp_path: Path, layout: str
) -> None:
    out, features = _build_and_add(fused_inference, hm_slice, slice_features, tmp_path, "", layout)

    with Bundle.open(out) as bundle:
        assert bundle.stores_states and bundle.rows == 28
        assert bundle.manifest["states"]["fusion_layer"] == 1 and set(STATE_FILES) <= set(
            bundle.manifest["files"]
        )
        assert "codecs" not in bundle.manifest["states"]
        assert not any((out / name).exists() for name in STATE_CODEC_FILES)
        # Re-ranking reads the states, so the bundle carries no patch codes.
        assert "patch_codec" not in bundle.manifest and bundle.codec is None
        assert not any((out / name).exists() for name in PATCH_FILES)
        rows = np.arange(28)
        token_ids = bundle.token_ids(rows)
        text, mask = bundle.text_states(rows)
        image = bundle.image_states(rows)
        exact = features[:28].astype(np.float32)  # the bundle's states come from the exact features
        expected_text, expected_mask = fused_inference.text_states(token_ids)
        np.testing.assert_array_equal(mask, expected_mask)
        np.testing.assert_allclose(text[mask], expected_text[mask], atol=3e-2)
        np.testing.assert_allclose(image, fused_inference.image_states(exact), atol=3e-2)  # bf16 batches

        # Pairs built from stored states score as the model's whole joint pass does.
        similarity = np.linspace(-0.2, 0.4, 28).astype(np.float32)
        scores = fused_inference.score_states(PairStates(text, mask, image, similarity))
        expected = fused_inference.match(token_ids, exact, tower_similarity=similarity)
        np.testing.assert_allclose(scores, expected, atol=5e-2)

        # A text query's candidates: only the requested rows, padded to their own longest text.
        some = np.array([3, 21])
        text, mask = bundle.text_states(some)
        assert text.shape[:2] == mask.shape == (2, max(len(bundle.token_ids(some)[i]) for i in range(2)))

    if layout == "padded":  # bundles from before stop 34 name no layout: they read as padded
        manifest = json.loads((out / MANIFEST).read_text())
        del manifest["states"]["text_layout"]
        (out / MANIFEST).write_text(json.dumps(manifest))
        with Bundle.open(out) as bundle:
            np.testing.assert_array_equal(bundle.text_states(some)[0], text)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_coded_states_are_stored_for_built_and_added_items(
    hm_slice, fused_inference, slice_features, tmp_path: Path, layout: str
) -> None:
    out, features = _build_and_add(fused_inference, hm_slice, slice_features, tmp_path, "PQ64", layout)
    hidden = fused_inference.model.bert.config.hidden_size

    with Bundle.open(out) as bundle:
        section = bundle.manifest["states"]
        assert section["dtype"] == "uint8" and set(STATE_CODEC_FILES) <= set(bundle.manifest["files"])
        assert not set(PATCH_FILES) & set(bundle.manifest["files"])
        assert not any((out / name).exists() for name in PATCH_FILES)
        # 64 bytes a state, against 2 * hidden in float16: the whole point. Ragged text states hold the
        # items' word pieces alone, so fewer states than 28 texts padded to max_len.
        pieces = int(np.load(out / "token_lengths.npy").sum())
        max_len = bundle.manifest["tokens"]["max_len"]
        assert section["text_layout"] == layout
        text_shape = (pieces, 64) if layout == "ragged" else (28, max_len, 64)
        assert layout == "padded" or pieces < 28 * max_len
        for name, shape in zip(STATE_FILES, (text_shape, (28, 16, 64)), strict=True):
            assert section["codecs"][name]["factory"] == "PQ64"
            stored = np.load(out / name, mmap_mode="r")
            assert stored.dtype == np.uint8 and stored.shape == shape
        rows = np.arange(28)
        token_ids = bundle.token_ids(rows)
        text, mask = bundle.text_states(rows)
        image = bundle.image_states(rows)
        assert text.dtype == image.dtype == np.float16
        assert text.shape[2] == image.shape[2] == hidden
        exact = features[:28].astype(np.float32)
        expected_text, expected_mask = fused_inference.text_states(token_ids)
        expected_image = fused_inference.image_states(exact)
        np.testing.assert_array_equal(mask, expected_mask)

        # Decoded states are the model's up to the codes' error, for added rows (codecs kept) as for built
        # ones (the tiny model's 64-d states get 1-d sub-quantizers: 8 bits a value, errors near 3e-4).
        def error(decoded: np.ndarray, expected: np.ndarray) -> float:
            decoded, expected = decoded.astype(np.float32), expected.astype(np.float32)
            return float(((decoded - expected) ** 2).sum() / (expected**2).sum())

        for part in (slice(0, 20), slice(20, 28)):
            assert error(text[part][mask[part]], expected_text[part][mask[part]]) < 2e-3
            assert error(image[part], expected_image[part]) < 2e-3

        # Pairs from decoded states score as the model's whole joint pass does, to the codes' error.
        similarity = np.linspace(-0.2, 0.4, 28).astype(np.float32)
        scores = fused_inference.score_states(PairStates(text, mask, image, similarity))
        expected = fused_inference.match(token_ids, exact, tower_similarity=similarity)
        np.testing.assert_allclose(scores, expected, atol=5e-2)


def test_bundles_of_models_without_a_fusion_layer_store_no_states(base_bundle: Path) -> None:
    with Bundle.open(base_bundle) as bundle:
        assert not bundle.stores_states and "states" not in bundle.manifest
    assert not any((base_bundle / name).exists() for name in STATE_FILES + STATE_CODEC_FILES)
