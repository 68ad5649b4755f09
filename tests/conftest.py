"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

# The real catalogues sit beside the repository, at ../shared/data, read-only.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real H&M and Myntra catalogues; tests that need them skip where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hm_slice(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """(catalogue, float16 patch features) of the first 64 H&M items, through the real EfficientNet once."""
    from model.catalogue import load_catalogue
    from model.data import catalogue_features
    from model.patch_features import PatchFeatureConfig

    catalogue = load_catalogue(f"hm:{shared_data / 'hm'}", limit=64)
    return catalogue_features(catalogue, tmp_path_factory.mktemp("feature-cache"), PatchFeatureConfig())
