"""The fusion layer: below it text and patches attend to themselves only, from it up to each other; a pair's
score from its sides' states (what index bundles store) is the score of the whole joint pass."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import DEFAULT_TEXT_MODEL, TINY_BERT, FashionBertConfig, resolve_text_model
from model.fashionbert import FashionBert
from model.inference import FashionBertInference
from model.pair_states import PairStates


def tiny(fusion_layer: int) -> FashionBert:
    torch.manual_seed(0)
    config = FashionBertConfig(
        bert=dict(TINY_BERT), patch_feature_dim=32, num_patches=16, embed_dim=16, fusion_layer=fusion_layer
    )
    return FashionBert(config).eval()


def tiny_inference(fusion_layer: int) -> FashionBertInference:
    """`tiny` behind the inference wrapper, with MiniLM's WordPiece vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    return FashionBertInference(tiny(fusion_layer), tokenizer)


def reference_joint_pass(
    model: FashionBert, ids: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor, fusion_layer: int
) -> torch.Tensor:
    """BERT's layers over the whole `[CLS] text [SEP] patches` sequence with explicit additive masks: below
    `fusion_layer` block-diagonal (a token sees only its own side), above it everything but padding."""
    text = model.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    image = model.patch_embeddings(model.pool_patches(patches), model._image_segment())
    hidden = torch.cat([text, image], dim=1)
    t, n = ids.shape[1], image.shape[1]
    keys = torch.cat([mask.bool(), torch.ones(len(ids), n, dtype=torch.bool)], dim=1)  # (B, L)
    side = torch.arange(t + n) >= t  # False: text, True: image
    same_side = side[:, None] == side[None, :]  # (L, L)
    for i, layer in enumerate(model.bert.encoder.layer):
        allowed = keys[:, None, None, :] & (same_side if i < fusion_layer else True)  # (B, 1, L, L)
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden = layer(hidden, additive)
    return hidden


@pytest.mark.parametrize("fusion_layer", [0, 1])
def test_the_joint_pass_masks_attention_across_sides_below_the_fusion_layer(fusion_layer: int) -> None:
    model = tiny(fusion_layer)
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    patches = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = reference_joint_pass(model, ids, mask, patches, fusion_layer)
        got = model.joint_hidden(ids, mask, model.pool_patches(patches))
    real = torch.cat([mask.bool(), torch.ones(2, 4, dtype=torch.bool)], dim=1)  # padding outputs are moot
    assert torch.allclose(got[real], expected[real], atol=1e-5)


@pytest.mark.parametrize("fusion_layer", [0, 1])
def test_scores_from_side_states_are_the_match_scores(fusion_layer: int) -> None:
    inference = tiny_inference(fusion_layer)
    texts = ["black satin midi skirt", "a red wool jumper with long sleeves and ribbed cuffs", "cap"]
    token_ids = inference.tokenize(texts)
    patches = np.random.default_rng(0).standard_normal((3, 16, 32)).astype(np.float32)
    similarity = np.array([0.1, 0.5, -0.2], np.float32)
    expected = inference.match(token_ids, patches, tower_similarity=similarity)

    # As the service gathers them: one request per pair, each padded to its own text, joined in a batch.
    text, mask = inference.text_states(token_ids)
    image = inference.image_states(patches)
    assert text.dtype == image.dtype == np.float16 and image.shape == (3, 4, TINY_BERT["hidden_size"])
    requests = []
    for i, ids in enumerate(token_ids):
        requests.append(
            PairStates(
                text[i : i + 1, : len(ids)],
                mask[i : i + 1, : len(ids)],
                image[i : i + 1],
                similarity[i : i + 1],
            )
        )
    batch = PairStates.concat(requests)
    assert batch.text.shape[1] == max(len(ids) for ids in token_ids)
    np.testing.assert_allclose(inference.score_states(batch), expected, atol=2e-2)
    # And a broadcast query side (read-only views), as a text query pairs one text with every image.
    query = PairStates(
        np.broadcast_to(text[:1, : len(token_ids[0])], (3, len(token_ids[0]), text.shape[2])),
        np.broadcast_to(mask[:1, : len(token_ids[0])], (3, len(token_ids[0]))),
        image,
        similarity,
    )
    expected = inference.match([token_ids[0]] * 3, patches, tower_similarity=similarity)
    np.testing.assert_allclose(inference.score_states(query), expected, atol=2e-2)


@pytest.mark.parametrize("fusion_layer", [0, 1])
def test_one_text_pass_gives_the_tower_embedding_and_the_side_states(fusion_layer: int) -> None:
    inference = tiny_inference(fusion_layer)
    # Unsorted lengths across two batches: rows must come back in the caller's order.
    texts = ["a red wool jumper with long sleeves and ribbed cuffs", "cap", "black satin midi skirt"]
    token_ids = inference.tokenize(texts)
    embeddings, states, mask = inference.encode_token_ids_with_states(token_ids, batch_size=2)
    np.testing.assert_allclose(embeddings, inference.encode_token_ids(token_ids), atol=1e-2)
    expected_states, expected_mask = inference.text_states(token_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(states[mask], expected_states[mask], atol=2e-2)
    assert states.dtype == np.float16


@pytest.mark.parametrize("fusion_layer", [-1, 2])
def test_a_fusion_layer_must_leave_a_joint_layer(fusion_layer: int) -> None:
    with pytest.raises(ValueError, match="fusion_layer"):
        tiny(fusion_layer)


def test_checkpoints_keep_their_fusion_layer_and_older_ones_read_as_zero(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    path = save_checkpoint(tiny(1), tokenizer, tmp_path / "fused", {})
    assert load_checkpoint(path)[0].config.fusion_layer == 1
    data = asdict(FashionBertConfig(bert=dict(TINY_BERT)))
    del data["fusion_layer"]  # a config.json written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert FashionBertConfig.from_json(tmp_path / "old.json").fusion_layer == 0


def test_evaluation_scores_a_fused_model_from_states_as_match_does() -> None:
    from model.evaluation import _match_pairs

    inference = tiny_inference(fusion_layer=1)
    token_ids = inference.tokenize(
        ["black satin midi skirt", "red wool jumper, ribbed cuffs", "cap", "socks"]
    )
    patches = np.random.default_rng(1).standard_normal((4, 16, 32)).astype(np.float32)
    text_index, image_index = np.array([0, 0, 0, 2, 3, 1]), np.array([0, 1, 2, 2, 1, 3])
    texts = [token_ids[i] for i in text_index]
    for similarity in (None, np.linspace(-0.3, 0.3, 6).astype(np.float32)):
        got = _match_pairs(inference, token_ids, patches, text_index, image_index, 2, similarity)
        expected = inference.match(texts, patches[image_index], tower_similarity=similarity)
        np.testing.assert_allclose(got, expected, atol=2e-2)
