"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import TINY_BERT

# The real catalogues sit beside the repository, at ../shared/data, read-only.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real H&M and Myntra catalogues; tests that need them skip where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's patch-feature cache folder (`--cache` for CLI tests): `hm_slice` fills it."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def hm_slice(shared_data: Path, feature_cache_dir: Path):
    """(catalogue, float16 patch features) of the first 64 H&M items, through the real EfficientNet once,
    with colour histograms appended (what a new model reads)."""
    from model.catalogue import load_catalogue
    from model.data import catalogue_features
    from model.patch_features import PatchFeatureConfig

    catalogue = load_catalogue(f"hm:{shared_data / 'hm'}", limit=64)
    return catalogue_features(catalogue, feature_cache_dir, PatchFeatureConfig(colour=True))


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 as on a CPU with AMX or AVX-512 BF16, whatever this one has: for tests of bf16's numerics,
    which an AVX2-only CPU would otherwise run in fp32 (`model/precision.py`)."""
    from model import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)


def _save_tiny_checkpoint(out: Path, fusion_layer: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer

    from model.checkpoint import save_checkpoint
    from model.config import DEFAULT_TEXT_MODEL, FashionBertConfig, resolve_text_model
    from model.fashionbert import FashionBert
    from model.patch_features import PatchFeatureConfig

    torch.manual_seed(0)
    config = FashionBertConfig(bert=dict(TINY_BERT), embed_dim=32, fusion_layer=fusion_layer)
    config = config.with_patch_features(PatchFeatureConfig(colour=True))  # 8 x 8 patches of 1280 + 256
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    return save_checkpoint(FashionBert(config), tokenizer, out, {})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved checkpoint of a tiny random FashionBERT (hidden 64, 2 layers, embed 32) with the real tokenizer,
    reading `hm_slice`'s patch features (CNN + colour)."""
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def fused_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `tiny_checkpoint`, with fusion layer 1: its first layer reads text and patches apart."""
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("fused") / "checkpoint", fusion_layer=1)


@pytest.fixture(scope="session")
def slice_features(hm_slice):
    """The slice's cached features by item id, as `FeatureCache.features_for` would return them: an
    `index.build.PatchFeatureSource`."""
    catalogue, features = hm_slice
    row_of = {item.id: row for row, item in enumerate(catalogue.items)}

    def source(part):
        kept = [item for item in part.items if item.id in row_of]
        return part.subset(kept), features[[row_of[item.id] for item in kept]]

    return source


@pytest.fixture(scope="session")
def build_slice_bundle(tiny_checkpoint: Path, hm_slice, slice_features):
    """Build a bundle of some of `hm_slice`'s items: `build(items, out, checkpoint=tiny_checkpoint) -> out`.
    SQ8 patch codes: no codec training (PQ64's k-means is most of a build this small), near-exact patches."""
    from index.build import build_bundle
    from index.config import IndexConfig
    from model.inference import FashionBertInference

    catalogue, _ = hm_slice
    encoders: dict[Path, FashionBertInference] = {}

    def build(items, out: Path, checkpoint: Path = tiny_checkpoint) -> Path:
        if checkpoint not in encoders:
            encoders[checkpoint] = FashionBertInference.from_checkpoint(checkpoint, device="cpu")
        build_bundle(
            encoders[checkpoint],
            catalogue.subset(items),
            slice_features,
            out,
            IndexConfig(patch_codec="SQ8"),
            progress=False,
        )
        return out

    return build
