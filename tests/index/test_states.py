"""Bundles of a model with a fusion layer store every item's side states below it, built and added alike,
and re-ranking from them scores what the model scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.build import add_to_bundle, build_bundle
from index.bundle import STATE_FILES, Bundle
from model.pair_states import PairStates
from tests.index.conftest import TEST_CONFIG


@pytest.fixture(scope="module")
def fused_inference(fused_checkpoint: Path):
    from model.inference import FashionBertInference

    return FashionBertInference.from_checkpoint(fused_checkpoint, device="cpu")


def test_states_are_stored_for_built_and_added_items(
    hm_slice, fused_inference, slice_features, tmp_path: Path
) -> None:
    catalogue, features = hm_slice
    out = tmp_path / "fused"
    build_bundle(
        fused_inference,
        catalogue.subset(catalogue.items[:20]),
        slice_features,
        out,
        TEST_CONFIG,
        progress=False,
    )
    add_to_bundle(
        fused_inference, out, catalogue.subset(catalogue.items[20:28]), slice_features, progress=False
    )

    with Bundle.open(out) as bundle:
        assert bundle.stores_states and bundle.rows == 28
        assert bundle.manifest["states"]["fusion_layer"] == 1 and set(STATE_FILES) <= set(
            bundle.manifest["files"]
        )
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


def test_bundles_of_models_without_a_fusion_layer_store_no_states(base_bundle: Path) -> None:
    with Bundle.open(base_bundle) as bundle:
        assert not bundle.stores_states and "states" not in bundle.manifest
    assert not any((base_bundle / name).exists() for name in STATE_FILES)
