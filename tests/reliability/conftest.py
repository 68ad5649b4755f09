"""A tiny model and two small real-data bundles (disjoint items) that the reliability suites serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="session")
def reliability_bundles(
    tiny_checkpoint: Path, hm_slice: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """`a` holds the slice's first 32 H&M items, `b` the other 32: a result names the bundle it came from."""
    from index.build import build_bundle
    from index.config import IndexConfig
    from model.inference import FashionBertInference

    items, features = hm_slice
    row_of = {item.id: row for row, item in enumerate(items.items)}

    def patch_features(part: Any) -> tuple[Any, np.ndarray]:
        return part, features[[row_of[item.id] for item in part.items]]

    encoder = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    root = tmp_path_factory.mktemp("reliability-bundles")
    half = len(items.items) // 2
    for name, part in (("a", items.items[:half]), ("b", items.items[half:])):
        build_bundle(
            encoder,
            items.subset(part),
            patch_features,
            root / name,
            IndexConfig(patch_codec="SQ8"),
            progress=False,
        )
    return {"a": root / "a", "b": root / "b"}
