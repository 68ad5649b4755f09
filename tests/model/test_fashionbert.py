"""The model's shapes, masks, pretrained loading and checkpoint round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, BertModel

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.colour import COLOUR_DIM
from model.config import DEFAULT_TEXT_MODEL, TINY_BERT, FashionBertConfig, resolve_text_model
from model.fashionbert import FashionBert, FashionBertForPretraining, StackedMLP, pool_patches
from model.inference import FashionBertInference
from model.patches import pool_grid
from model.precision import bf16_autocast
from model.training import grow_colour_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))


@pytest.fixture()
def tiny() -> FashionBert:
    torch.manual_seed(0)
    config = FashionBertConfig(bert=dict(TINY_BERT), patch_feature_dim=32, num_patches=16, embed_dim=16)
    return FashionBert(config).eval()


def test_outward_face_shapes(tiny: FashionBert) -> None:
    ids = torch.randint(1000, 2000, (3, 10))
    mask = torch.ones_like(ids)
    patches = torch.randn(3, 16, 32)
    assert tiny.match(ids, mask, patches).shape == (3,)
    text, image = tiny.encode_text(ids, mask), tiny.encode_image(patches)
    assert text.shape == image.shape == (3, 16)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_padding_does_not_change_scores(tiny: FashionBert) -> None:
    ids = torch.randint(1000, 2000, (1, 7))
    patches = torch.randn(1, 16, 32)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = tiny.match(ids, torch.ones_like(ids), patches)
        long = tiny.match(padded, mask, patches)
        assert torch.allclose(short, long, atol=1e-5)
        assert torch.allclose(
            tiny.encode_text(ids, torch.ones_like(ids)), tiny.encode_text(padded, mask), atol=1e-5
        )


def test_joint_sequence_is_text_then_pooled_patches(tiny: FashionBert) -> None:
    ids = torch.randint(1000, 2000, (2, 6))
    pooled = tiny.pool_patches(torch.randn(2, 16, 32))  # 4 x 4 grid, pooled 2 x 2 -> 2 x 2
    assert pooled.shape == (2, 4, 32)
    hidden = tiny.joint_hidden(ids, torch.ones_like(ids), pooled)
    assert hidden.shape == (2, 6 + 4, 64)


def test_pool_patches_averages_grid_neighbours() -> None:
    grid = torch.arange(16.0).reshape(1, 16, 1)  # row-major 4 x 4: row r, column c holds 4r + c
    pooled = pool_patches(grid, 2).flatten()
    # top-left block {0, 1, 4, 5}, top-right {2, 3, 6, 7}, bottom-left {8, 9, 12, 13}, bottom-right
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pool_patches(grid, 1), grid)
    # The numpy twin that index bundles pool with agrees, in float16 too.
    numpy_grid = np.random.default_rng(0).standard_normal((3, 16, 5)).astype(np.float16)
    torch_pooled = pool_patches(torch.from_numpy(numpy_grid.astype(np.float32)), 2).numpy()
    np.testing.assert_allclose(pool_grid(numpy_grid, 2).astype(np.float32), torch_pooled, atol=2e-3)
    assert pool_grid(numpy_grid, 2).dtype == np.float16 and pool_grid(numpy_grid, 1) is numpy_grid


def test_match_reads_a_grid_pooled_beforehand_the_same(tiny: FashionBert) -> None:
    """Bundles store the pooled grid: scoring it must equal scoring the patch network's full grid."""
    ids = torch.randint(1000, 2000, (2, 5))
    mask = torch.ones_like(ids)
    patches = torch.randn(2, 16, 32)
    with torch.no_grad():
        full = tiny.match(ids, mask, patches)
        pooled = tiny.match(ids, mask, pool_patches(patches, 2))
        assert torch.allclose(full, pooled, atol=1e-5)
        image = tiny.encode_image(patches)  # the mean over equal cells is the mean over patches
        assert torch.allclose(image, tiny.encode_image(pool_patches(patches, 2)), atol=1e-5)


def test_match_is_cross_encoder_plus_scaled_tower_cosine(tiny: FashionBert) -> None:
    ids = torch.randint(1000, 2000, (3, 5))
    ids[2] = ids[0]  # a repeated text (a text query against several images) is embedded once
    mask = torch.ones_like(ids)
    patches = torch.randn(3, 16, 32)
    with torch.no_grad():
        cosine = (tiny.encode_text(ids, mask) * tiny.encode_image(patches)).sum(-1)
        hidden = tiny.joint_hidden(ids, mask, tiny.pool_patches(patches))
        expected = tiny.alignment_logits(hidden, mask, cosine)
        assert torch.allclose(tiny.match(ids, mask, patches), expected, atol=1e-5)
        tiny.tower_scale.fill_(0.0)
        cross_only = tiny.alignment_logits(hidden, mask, cosine)
    assert torch.allclose(expected - cross_only, 10.0 * cosine, atol=1e-5)


def test_pretraining_heads_shapes(tiny: FashionBert) -> None:
    wrapper = FashionBertForPretraining(tiny)
    assert wrapper.mlm_head.predictions.decoder.weight is tiny.bert.embeddings.word_embeddings.weight
    ids = torch.randint(1000, 2000, (2, 6))
    outputs = wrapper(
        ids,
        torch.ones_like(ids),
        torch.randn(2, 4, 32),
        torch.tensor([[0, 1], [1, 2]]),
        torch.tensor([[1, 3]]),
        torch.zeros(2),
    )
    assert outputs.mlm_logits.shape == (2, 30522)
    assert outputs.mpm_predictions.shape == (1, 32)
    assert outputs.alignment_logits.shape == (2,)


def test_real_minilm_weights_load_with_no_missing_keys() -> None:
    _, info = BertModel.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    config = FashionBertConfig()
    model = FashionBert.from_pretrained_text_model(config)
    assert config.bert["hidden_size"] == 384 and config.bert["num_hidden_layers"] == 6
    reference = BertModel.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    assert torch.equal(
        model.bert.encoder.layer[3].output.dense.weight, reference.encoder.layer[3].output.dense.weight
    )


def test_checkpoint_round_trip(tiny: FashionBert, tokenizer, tmp_path) -> None:
    save_checkpoint(tiny, tokenizer, tmp_path / "ckpt", {"steps": 3})
    loaded, loaded_tokenizer = load_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor(tokenizer(["black satin midi skirt"])["input_ids"])
    patches = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.allclose(
            tiny.match(ids, torch.ones_like(ids), patches), loaded.match(ids, torch.ones_like(ids), patches)
        )
    assert loaded_tokenizer("skirt")["input_ids"] == tokenizer("skirt")["input_ids"]
    assert json.loads((tmp_path / "ckpt" / "summary.json").read_text()) == {"steps": 3}
    inference = FashionBertInference.from_checkpoint(tmp_path / "ckpt", device="cpu")
    assert len(inference.fingerprint) == 64
    assert inference.match(inference.tokenize(["a", "b c"]), patches.repeat(2, 1, 1).numpy()).shape == (2,)


def sequential_tower_weights(model: FashionBert) -> dict[str, torch.Tensor]:
    """The model's weights as checkpoints from before stacked towers held them: each image tower member an
    `nn.Sequential` of its own (`image_towers.<member>.<path>.<layer>.<weight|bias>`)."""
    layers = {
        "norm_weight": "0.weight",
        "norm_bias": "0.bias",
        "weight1": "1.weight",
        "bias1": "1.bias",
        "weight2": "3.weight",
        "bias2": "3.bias",
    }
    weights = {}
    for key, value in model.state_dict().items():
        if not key.startswith("image_towers."):
            weights[key] = value
            continue
        _, path, name = key.split(".")
        for member, member_value in enumerate(value):
            weights[f"image_towers.{member}.{path}.{layers[name]}"] = (
                member_value.T if name.startswith("weight") else member_value
            ).contiguous()
    return weights


def sequential_towers(model: FashionBert) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Each image tower member computed as plain layers, one member at a time, from those weights: what the
    stacked forward must reproduce. (B, D) pooled -> (B, E), not normalised."""
    weights, cnn_dim = sequential_tower_weights(model), model.config.cnn_feature_dim

    def mlp(prefix: str, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], weights[prefix + "0.weight"], weights[prefix + "0.bias"])
        x = F.gelu(F.linear(x, weights[prefix + "1.weight"], weights[prefix + "1.bias"]))
        return F.linear(x, weights[prefix + "3.weight"], weights[prefix + "3.bias"])

    def member(k: int, pooled: torch.Tensor) -> torch.Tensor:
        embedding = mlp(f"image_towers.{k}.projection.", pooled[:, :cnn_dim])
        if model.config.colour_dim:
            embedding = embedding + mlp(f"image_towers.{k}.colour.", pooled[:, cnn_dim:])
        return embedding

    return [partial(member, k) for k in range(len(model.image_towers))]


@pytest.mark.parametrize("members", [1, 3])
def test_checkpoints_from_before_stacked_towers_load(tokenizer, tmp_path, members: int) -> None:
    """Older checkpoints held each image tower as modules of its own (and before ensembles, their one tower
    as `image_projection` / `image_colour_projection`): they load and embed exactly as written."""
    torch.manual_seed(0)
    config = FashionBertConfig(
        bert=dict(TINY_BERT), patch_feature_dim=40, colour_dim=8, num_patches=16, embed_dim=16
    )
    model = FashionBert(replace(config, image_towers=members)).eval()
    torch.nn.init.normal_(model.image_towers.colour.weight2)  # trained colour paths are not zero
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    old = sequential_tower_weights(model)
    if members == 1:  # before ensembles
        renames = {
            "image_towers.0.projection.": "image_projection.",
            "image_towers.0.colour.": "image_colour_projection.",
        }
        for new_prefix, old_prefix in renames.items():
            old = {key.replace(new_prefix, old_prefix): value for key, value in old.items()}
        assert {key.split(".")[0] for key in old} >= {"image_projection", "image_colour_projection"}
    else:
        assert "image_towers.2.colour.3.weight" in old
    save_file(old, tmp_path / "ckpt" / "model.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    patches = torch.rand(3, 16, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(patches), model.encode_image(patches), rtol=0, atol=0)


def test_a_stacked_member_starts_as_the_layers_it_stacks() -> None:
    """A member built under a seed holds the weights `nn.LayerNorm` and `nn.Linear` draw under it, so tower k
    of a fit is the network seed + k gives, whichever way the towers are stored."""
    torch.manual_seed(3)
    stacked = StackedMLP(1, 12, 8, 4)
    torch.manual_seed(3)
    norm, first, _, second = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 4))
    for got, expected in [
        (stacked.norm_weight[0], norm.weight),
        (stacked.weight1[0], first.weight.T),
        (stacked.bias1[0], first.bias),
        (stacked.weight2[0], second.weight.T),
        (stacked.bias2[0], second.bias),
    ]:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not StackedMLP(2, 12, 8, 4, zero_last=True)(torch.randn(5, 12)).any()  # (K, B, E) zeros


def test_an_ensemble_of_image_towers_averages_their_embeddings(tokenizer, tmp_path) -> None:
    torch.manual_seed(0)
    config = FashionBertConfig(
        bert=dict(TINY_BERT), patch_feature_dim=32, num_patches=16, embed_dim=16, image_towers=3
    )
    model = FashionBert(config).eval()
    patches = torch.randn(4, 16, 32)
    pooled = patches.mean(1)
    with torch.no_grad():
        members = [F.normalize(tower(pooled), dim=-1) for tower in sequential_towers(model)]
        assert not torch.allclose(members[0], members[1])  # initialised apart
        expected = F.normalize(sum(members) / 3, dim=-1)
        torch.testing.assert_close(model.encode_image(patches), expected)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.image_towers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(patches), expected)


def test_bad_checkpoints_fail_clearly(tiny: FashionBert, tokenizer, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tiny, tokenizer, tmp_path / "ckpt", {})
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['model.safetensors'\]"):
        load_checkpoint(tmp_path / "ckpt")
    save_checkpoint(tiny, tokenizer, tmp_path / "other", {})
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["num_patches"] = 99
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"nonsense": 1}')
    with pytest.raises(CheckpointError, match="not a FashionBertConfig"):
        load_checkpoint(tmp_path / "other")


def test_inference_match_reuses_cached_text_embeddings(tiny: FashionBert, tokenizer) -> None:
    inference = FashionBertInference(tiny, tokenizer, device="cpu", text_cache_size=2)
    token_ids = inference.tokenize(["black satin midi skirt", "red wool coat", "black satin midi skirt"])
    patches = torch.randn(3, 16, 32)
    ids, mask = inference.pad(token_ids)
    with torch.no_grad(), bf16_autocast(inference.device):
        direct = tiny.match(ids, mask, patches).float().numpy()
    first = inference.match(token_ids, patches.numpy())
    assert np.allclose(first, direct, atol=0.05)  # bf16 where native: texts batched differently
    assert len(inference._text_cache) == 2  # two distinct texts, each encoded once

    calls = []
    original = inference.encode_token_ids
    inference.encode_token_ids = lambda ids, *a, **k: calls.append(len(ids)) or original(ids, *a, **k)
    assert np.array_equal(inference.match(token_ids, patches.numpy()), first)
    assert calls == []  # both texts came from the cache
    inference.match(inference.tokenize(["green linen shirt"]), patches[:1].numpy())
    assert calls == [1] and len(inference._text_cache) == 2  # least recently used text dropped


def test_bf16_weights_score_like_autocast(tiny_checkpoint, native_bf16) -> None:
    """Serving holds bf16 weights: the same towers and scores as autocast over fp32, to bf16 precision."""
    autocast = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    bf16 = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu", bf16_weights=True)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(autocast.model.parameters()).dtype == torch.float32
    dim = autocast.config.patch_feature_dim
    patches = np.random.default_rng(0).standard_normal((6, 64, dim)).astype(np.float32)
    token_ids = autocast.tokenize([f"black satin midi skirt number {i}" for i in range(6)])
    np.testing.assert_allclose(bf16.encode_images(patches), autocast.encode_images(patches), atol=0.03)
    np.testing.assert_allclose(
        bf16.encode_token_ids(token_ids), autocast.encode_token_ids(token_ids), atol=0.03
    )
    np.testing.assert_allclose(bf16.match(token_ids, patches), autocast.match(token_ids, patches), atol=0.1)


def test_match_takes_the_tower_cosine_from_recall(tiny: FashionBert, tokenizer) -> None:
    """The service hands over its recall scores as the tower term: the same logits, and no tower runs
    (an image query's candidate texts are never embedded)."""
    inference = FashionBertInference(tiny, tokenizer, device="cpu")
    token_ids = inference.tokenize(["black satin midi skirt", "red wool coat", "green linen shirt"])
    patches = np.random.default_rng(0).standard_normal((3, 16, 32)).astype(np.float32)
    cosine = (inference.encode_token_ids(token_ids) * inference.encode_images(patches)).sum(-1)
    inference._text_cache.clear()
    given = inference.match(token_ids, patches, tower_similarity=cosine)
    assert len(inference._text_cache) == 0  # no text went through the tower
    np.testing.assert_allclose(given, inference.match(token_ids, patches), atol=0.05)
    shifted = inference.match(token_ids, patches, tower_similarity=cosine + 0.1)
    np.testing.assert_allclose(shifted - given, 0.1 * float(tiny.tower_scale.detach()), atol=0.05)


def test_int8_matching_scores_like_fp32_and_leaves_the_towers_alone(tiny_checkpoint) -> None:
    """The int8 copy re-ranks like the model (to int8 precision); towers and the original stay fp32/bf16."""
    reference = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    int8 = FashionBertInference.from_checkpoint(
        tiny_checkpoint, device="cpu", bf16_weights=True, int8_matching=True
    )
    assert int8.int8_matching and not reference.int8_matching
    towers_dtype = torch.bfloat16 if int8.precision == "bf16" else torch.float32  # bf16 where native
    assert next(int8.model.parameters()).dtype == towers_dtype  # towers: the model as served
    layer = int8.matcher.bert.encoder.layer[0].attention.self.query
    assert "quantized" in type(layer).__module__
    assert "quantized" in type(int8.matcher.patch_embeddings.projection).__module__
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((40, 64, reference.config.patch_feature_dim)).astype(np.float32)
    token_ids = reference.tokenize([f"black satin midi skirt number {i}" for i in range(40)])
    cosine = np.zeros(40, np.float32)  # the cross-encoder's part alone: the tower term is added exactly
    expected = reference.match(token_ids, patches, tower_similarity=cosine)
    got = int8.match(token_ids, patches, tower_similarity=cosine)
    assert np.corrcoef(expected, got)[0, 1] > 0.95, np.corrcoef(expected, got)[0, 1]
    np.testing.assert_allclose(got, expected, atol=0.2 * np.ptp(expected))


def test_colour_enters_through_its_own_paths(tiny: FashionBert) -> None:
    """The last `colour_dim` dims of a patch feature reach the towers and the joint pass through the colour
    paths; masked patch modelling predicts the CNN part alone."""
    torch.manual_seed(0)
    config = FashionBertConfig(
        bert=dict(TINY_BERT), patch_feature_dim=40, colour_dim=8, num_patches=16, embed_dim=16
    )
    model = FashionBert(config).eval()
    assert model.patch_embeddings.projection.in_features == 32
    assert FashionBertForPretraining(model).mpm_head[-1].out_features == 32
    torch.nn.init.normal_(
        model.patch_embeddings.colour_projection[-1].weight
    )  # trained colour paths are not zero
    torch.nn.init.normal_(model.image_towers.colour.weight2)
    ids = torch.randint(1000, 2000, (2, 6))
    patches = torch.rand(2, 16, 40)
    recoloured = patches.clone()
    recoloured[..., 32:] = torch.rand(2, 16, 8)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(patches), model.encode_image(recoloured))
        assert not torch.allclose(
            model.match(ids, torch.ones_like(ids), patches),
            model.match(ids, torch.ones_like(ids), recoloured),
        )
    assert tiny.patch_embeddings.colour_projection is None and tiny.image_towers.colour is None


def test_growing_a_colour_path_keeps_the_trained_scores(tiny: FashionBert) -> None:
    """`fashionbert train --init CKPT --add-colour`: the grown model scores as the checkpoint did until it
    trains, whatever the colour histograms say."""
    grown = grow_colour_path(tiny).eval()
    assert grown.config.colour_dim == COLOUR_DIM and grown.config.patch_features["colour"] is True
    assert grown.config.patch_feature_dim == 32 + COLOUR_DIM
    ids = torch.randint(1000, 2000, (3, 8))
    mask = torch.ones_like(ids)
    patches = torch.randn(3, 16, 32)
    with_colour = torch.cat([patches, torch.rand(3, 16, COLOUR_DIM)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(grown.encode_image(with_colour), tiny.encode_image(patches))
        torch.testing.assert_close(grown.encode_text(ids, mask), tiny.encode_text(ids, mask))
        torch.testing.assert_close(grown.match(ids, mask, with_colour), tiny.match(ids, mask, patches))
    with pytest.raises(ValueError, match="already"):
        grow_colour_path(grown)
