"""Fitting the image tower to a locked text tower: it learns, it reads colour, it touches nothing else."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.cli import main
from model.checkpoint import load_checkpoint
from model.config import TINY_BERT, FashionBertConfig
from model.evaluation import text_codes
from model.fashionbert import FashionBert
from model.inference import FashionBertInference
from model.patch_features import PatchFeatureConfig
from model.tower_fit import (
    TextTowerFitConfig,
    TowerFitConfig,
    fit_image_tower,
    fit_text_tower,
    info_nce_against_every_text,
    symmetric_info_nce,
)


def tiny_colour_model() -> FashionBert:
    torch.manual_seed(0)
    config = FashionBertConfig(bert=dict(TINY_BERT), embed_dim=32)
    return FashionBert(config.with_patch_features(PatchFeatureConfig(colour=True)))


def image_to_text_r1(model: FashionBert, texts: np.ndarray, features: np.ndarray) -> float:
    with torch.no_grad():
        images = model.encode_image(torch.from_numpy(features.astype(np.float32))).numpy()
    return float((np.argmax(images @ texts.T, axis=1) == np.arange(len(texts))).mean())


def distinct_texts(n: int, dim: int) -> np.ndarray:
    """Stand-in locked text embeddings: random unit vectors, one per item."""
    texts = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return texts / np.linalg.norm(texts, axis=1, keepdims=True)


def test_fit_matches_images_to_their_texts_and_changes_nothing_else(hm_slice) -> None:
    catalogue, features = hm_slice
    model = tiny_colour_model()
    texts = distinct_texts(len(catalogue), model.config.embed_dim)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert image_to_text_r1(model, texts, features) < 0.1  # chance: 1 in 64

    (losses,) = fit_image_tower(  # one tower
        model, texts, features, text_codes(catalogue), TowerFitConfig(steps=150, batch_size=32)
    )
    assert losses[-1] < losses[0] / 3
    assert image_to_text_r1(model, texts, features) > 0.8
    for name, param in model.named_parameters():
        if not name.startswith("image_towers.") and name != "alignment_head.bias":
            torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)


def test_against_every_text_is_the_symmetric_loss_when_the_batch_is_the_split() -> None:
    generator = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    images = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    codes = torch.tensor([0, 1, 2, 2, 3, 4])  # items 2 and 3 share their text, so its embedding
    texts[3] = texts[2]
    order = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(
        info_nce_against_every_text(texts, images[order], order, codes, 7.0),
        symmetric_info_nce(texts[order], images[order], codes[order], 7.0),
    )


def test_against_every_text_counts_the_false_texts_outside_the_batch() -> None:
    """A text outside the batch that sits on an image of it raises the loss by exactly what the image's
    softmax over the wider set of texts says."""
    texts = torch.eye(4)[:3]  # items 0, 1 and a third text outside the batch
    images, batch, scale = torch.eye(4)[:2], torch.tensor([0, 1]), 5.0
    codes2 = torch.tensor([0, 1])
    alone = info_nce_against_every_text(texts[:2], images, batch, codes2, scale)
    torch.testing.assert_close(alone, symmetric_info_nce(texts[:2], images, codes2, scale))
    texts[2] = images[0]  # a false text as close to image 0 as its own
    wider = info_nce_against_every_text(texts, images, batch, torch.tensor([0, 1, 2]), scale)
    log_p = torch.log_softmax(scale * images @ texts.T, dim=1)
    # The text-to-image half is the batch's: symmetric_info_nce of the two items (both halves equal here).
    expected = (-(log_p[0, 0] + log_p[1, 1]) / 2 + symmetric_info_nce(texts[:2], images, codes2, scale)) / 2
    torch.testing.assert_close(wider, expected)
    assert wider > alone


def test_the_fit_ranks_images_against_every_text_unless_told_otherwise(hm_slice) -> None:
    """Batches of 8 show each image 7 false texts; the whole split shows it 63, so it learns more a step."""
    catalogue, features = hm_slice
    texts = distinct_texts(len(catalogue), 32)
    recall = {}
    for negatives in ("split", "batch"):
        model = tiny_colour_model()
        config = TowerFitConfig(steps=40, batch_size=8, text_negatives=negatives)
        fit_image_tower(model, texts, features, text_codes(catalogue), config)
        recall[negatives] = image_to_text_r1(model, texts, features)
    assert recall["split"] > 0.5 and recall["split"] > recall["batch"] + 0.05, recall  # measured: 0.58, 0.45
    with pytest.raises(ValueError, match="text_negatives"):
        TowerFitConfig(text_negatives="all")


def test_an_ensemble_fits_each_tower_apart_and_serves_their_average(hm_slice) -> None:
    catalogue, features = hm_slice
    model = tiny_colour_model()
    texts = distinct_texts(len(catalogue), model.config.embed_dim)
    config = TowerFitConfig(steps=150, batch_size=32, towers=3)
    losses = fit_image_tower(model, texts, features, text_codes(catalogue), config)
    assert len(losses) == 3 and all(tower[-1] < tower[0] / 3 for tower in losses)
    assert model.config.image_towers == len(model.image_towers) == 3
    first, second = model.image_towers.projection.weight1[:2]
    assert not torch.allclose(first, second)  # own seeds: own initialisation and batches
    assert image_to_text_r1(model, texts, features) > 0.8

    single = tiny_colour_model()
    fit_image_tower(single, texts, features, text_codes(catalogue), replace(config, towers=1))
    for name, weights in single.image_towers.state_dict().items():  # the first member: a single fit's tower
        torch.testing.assert_close(weights[0], model.image_towers.state_dict()[name][0], rtol=0, atol=0)


def test_the_fit_keeps_the_alignment_logits_mean_over_true_and_shuffled_pairs(hm_slice) -> None:
    """The logit's head part does not see the towers, so its mean over pairs moves by exactly the bias shift
    plus tower_scale x the cosines' move: the fit must cancel that move, not the ranking."""
    catalogue, features = hm_slice
    model = tiny_colour_model()
    texts = distinct_texts(len(catalogue), model.config.embed_dim)
    shuffled = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).numpy()

    def mean_tower_logit() -> float:
        with torch.no_grad():
            images = model.encode_image(torch.from_numpy(features.astype(np.float32))).numpy()
        cosines = np.concatenate([(texts * images).sum(1), (texts * images[shuffled]).sum(1)])
        return model.alignment_head.bias.detach().item() + model.tower_scale.detach().item() * float(
            cosines.mean()
        )

    bias, logit = model.alignment_head.bias.detach().item(), mean_tower_logit()
    fit_image_tower(model, texts, features, text_codes(catalogue), TowerFitConfig(steps=100, batch_size=32))
    assert (
        abs(model.alignment_head.bias.detach().item() - bias) > 0.5
    )  # the fit raised true pairs' cosine a lot
    assert mean_tower_logit() == pytest.approx(logit, abs=1e-3)


def test_the_fitted_tower_reads_colour(hm_slice) -> None:
    """With the CNN part of every feature blanked, only the colour histograms tell the images apart."""
    catalogue, features = hm_slice
    model = tiny_colour_model()
    colour_only = features.copy()
    colour_only[..., : model.config.cnn_feature_dim] = 0
    texts = distinct_texts(len(catalogue), model.config.embed_dim)
    fit_image_tower(
        model, texts, colour_only, text_codes(catalogue), TowerFitConfig(steps=150, batch_size=32)
    )
    assert image_to_text_r1(model, texts, colour_only) > 0.5


def test_views_are_fitted_on_beside_the_photos(hm_slice) -> None:
    """A view is a second look at the same items: a tower fitted with one reads it, one fitted without does
    not. The view here is the extreme look that keeps only the colour histograms."""
    catalogue, features = hm_slice
    colour_only = features.copy()
    colour_only[..., : tiny_colour_model().config.cnn_feature_dim] = 0
    texts = distinct_texts(len(catalogue), tiny_colour_model().config.embed_dim)
    config = TowerFitConfig(steps=150, batch_size=32)
    without, with_view = tiny_colour_model(), tiny_colour_model()
    fit_image_tower(without, texts, features, text_codes(catalogue), config)
    fit_image_tower(with_view, texts, features, text_codes(catalogue), config, views=[colour_only])
    assert image_to_text_r1(with_view, texts, colour_only) > 0.5
    assert image_to_text_r1(without, texts, colour_only) < 0.2
    assert image_to_text_r1(with_view, texts, features) > 0.8  # and the photos themselves still


def test_views_that_repeat_the_photos_change_nothing(hm_slice) -> None:
    catalogue, features = hm_slice
    texts = distinct_texts(len(catalogue), tiny_colour_model().config.embed_dim)
    config = TowerFitConfig(steps=20, batch_size=32)
    plain, repeated = tiny_colour_model(), tiny_colour_model()
    fit_image_tower(plain, texts, features, text_codes(catalogue), config)
    fit_image_tower(repeated, texts, features, text_codes(catalogue), config, views=[features, features])
    for name, weights in plain.image_towers.state_dict().items():
        torch.testing.assert_close(repeated.image_towers.state_dict()[name], weights, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="every item"):
        fit_image_tower(plain, texts, features, text_codes(catalogue), config, views=[features[:-1]])


def test_fit_image_tower_command(
    shared_data: Path, hm_slice, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fitted"
    args = ["fit-image-tower", "--model", str(tiny_checkpoint), "--out", str(out)]
    args += ["--data", f"hm:{shared_data / 'hm'}", "--limit", "64", "--cache", str(feature_cache_dir)]
    assert main([*args, "--steps", "20", "--batch-size", "16", "--towers", "2"]) == 0
    fitted = FashionBertInference.from_checkpoint(out, device="cpu")
    original = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    texts = ["black satin midi skirt", "red wool coat"]
    np.testing.assert_array_equal(fitted.encode_texts(texts), original.encode_texts(texts))
    _, features = hm_slice
    assert not np.allclose(fitted.encode_images(features[:4]), original.encode_images(features[:4]))
    assert json.loads((out / "config.json").read_text())["image_towers"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["image_tower_fit"]["final_loss"]) == 2
    assert (
        summary["image_tower_fit"]["config"]["steps"] == 20 and summary["image_tower_fit"]["train_items"] > 0
    )
    assert summary["image_tower_fit"]["config"]["text_negatives"] == "split"
    with pytest.raises(ValueError, match="already"):  # the tiny checkpoint reads colour already
        main([*args, "--add-colour", "--steps", "1"])
    load_checkpoint(out)  # a complete checkpoint
    with pytest.raises(SystemExit):  # argparse: "expected a positive whole number"
        main([*args, "--towers", "0"])


def test_fit_image_tower_command_with_views(
    shared_data: Path, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(feature_cache_dir, cache)  # the photos' own features, already computed; not the views'
    args = ["fit-image-tower", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "fitted")]
    args += ["--data", f"hm:{shared_data / 'hm'}", "--limit", "64", "--cache", str(cache)]
    args += ["--steps", "5", "--batch-size", "16", "--towers", "1"]
    assert main([*args, "--views", "flip,crop", "--text-negatives", "batch"]) == 0
    summary = json.loads((tmp_path / "fitted" / "summary.json").read_text())["image_tower_fit"]
    assert summary["views"] == ["flip", "crop"] and summary["config"]["text_negatives"] == "batch"
    for view in ("flip", "crop"):  # computed for the train items only
        (folder,) = cache.glob(f"*-{view}")
        assert len(list(folder.glob("*/*.npy"))) == summary["train_items"]
    with pytest.raises(SystemExit):  # argparse: "unknown views ['blur']"
        main([*args, "--views", "flip,blur"])


def test_features_command_caches_the_views_fit_image_tower_reads(
    shared_data: Path, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`features --views` computes the views ahead (the recipe times them before it sizes pre-training);
    `fit-image-tower --views` then finds every one in the cache and runs no patch network."""
    cache = tmp_path / "cache"
    shutil.copytree(feature_cache_dir, cache)
    data = ["--data", f"hm:{shared_data / 'hm'}", "--limit", "64", "--cache", str(cache)]
    assert main(["features", *data, "--views", "flip"]) == 0
    (folder,) = cache.glob("*-flip")
    written = {path: path.stat().st_mtime_ns for path in folder.glob("*/*.npy")}
    args = ["fit-image-tower", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "fitted"), *data]
    with patch(
        "model.patch_features.PatchFeatureExtractor.extract_pixels", side_effect=AssertionError("recomputed")
    ):
        assert main([*args, "--steps", "2", "--batch-size", "16", "--towers", "1", "--views", "flip"]) == 0
    summary = json.loads((tmp_path / "fitted" / "summary.json").read_text())["image_tower_fit"]
    assert len(written) == summary["train_items"] > 0  # the train split's photos, not the validation's
    assert {path: path.stat().st_mtime_ns for path in folder.glob("*/*.npy")} == written


def test_add_colour_needs_a_checkpoint_to_grow(shared_data: Path) -> None:
    with pytest.raises(SystemExit, match="--init"):
        main(["train", "--data", f"hm:{shared_data / 'hm'}", "--out", "unused", "--add-colour", "--tiny"])


def tokenized(catalogue) -> tuple[torch.Tensor, torch.Tensor]:
    """The catalogue's texts through the real tokenizer: (n, T) right-padded ids and attention mask."""
    from transformers import AutoTokenizer

    from model.config import DEFAULT_TEXT_MODEL, resolve_text_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    encoded = tokenizer([item.text for item in catalogue.items], padding=True, truncation=True, max_length=48)
    return torch.tensor(encoded["input_ids"]), torch.tensor(encoded["attention_mask"])


@pytest.mark.parametrize("refresh_every", [0, 20])
def test_the_text_fit_finds_the_locked_images_and_moves_only_the_text_tower(hm_slice, refresh_every) -> None:
    """Stand-in locked image embeddings (random unit vectors, one per item): the text tower must learn to
    find each item's, the image towers stay as they are, and the tower term's mean over true and shuffled
    pairs stays where it was (`keep_alignment_operating_point`: image i beside the shuffled text)."""
    catalogue, _ = hm_slice
    model = tiny_colour_model()
    ids, mask = tokenized(catalogue)
    images = torch.from_numpy(distinct_texts(len(catalogue), model.config.embed_dim))  # (n, E)
    codes = text_codes(catalogue)
    shuffled = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))

    def texts() -> torch.Tensor:
        with torch.no_grad():
            return model.eval().encode_text(ids, mask)

    def text_to_image_r1() -> float:
        best = (texts() @ images.T).argmax(1).numpy()
        return float((codes[best] == codes).mean())

    def mean_tower_logit() -> float:
        cosines = torch.cat([(texts() * images).sum(1), (texts()[shuffled] * images).sum(1)])
        return model.alignment_head.bias.item() + model.tower_scale.item() * cosines.mean().item()

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    r1, logit = text_to_image_r1(), mean_tower_logit()
    assert r1 < 0.1  # chance: 1 in 64
    # fp32, so that this test's fp32 encodings are the ones the fit's bias shift was computed from
    config = TextTowerFitConfig(
        steps=80, batch_size=16, learning_rate=5e-4, refresh_every=refresh_every, bf16=False
    )
    losses, moved = fit_text_tower(model, ids, mask, texts().numpy(), images[None], codes, config)
    assert losses[-1] < losses[0] / 2
    assert text_to_image_r1() > 0.5, text_to_image_r1()
    torch.testing.assert_close(moved, texts())  # what it returns: the moved tower's embeddings
    assert mean_tower_logit() == pytest.approx(logit, abs=1e-3)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "text_projection.weight" in moved and any(name.startswith("bert.encoder.") for name in moved)
    assert all(
        name.startswith(("bert.", "text_projection.")) or name == "alignment_head.bias" for name in moved
    )


def test_fit_image_tower_command_with_text_steps(
    shared_data: Path, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`--text-steps`: the text tower moves too, and the towers are fitted to it (the summary says so)."""
    out = tmp_path / "fitted"
    args = ["fit-image-tower", "--model", str(tiny_checkpoint), "--out", str(out)]
    args += ["--data", f"hm:{shared_data / 'hm'}", "--limit", "64", "--cache", str(feature_cache_dir)]
    args += ["--steps", "5", "--batch-size", "16", "--towers", "1"]
    assert main([*args, "--text-steps", "3"]) == 0
    fitted = FashionBertInference.from_checkpoint(out, device="cpu")
    original = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    texts = ["black satin midi skirt", "red wool coat"]
    assert not np.allclose(fitted.encode_texts(texts), original.encode_texts(texts))
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["text_tower_fit"]["config"]["steps"] == 3
        and summary["image_tower_fit"]["config"]["steps"] == 5
    )
    with pytest.raises(SystemExit):  # argparse: "expected a whole number"
        main([*args, "--text-steps", "-1"])
