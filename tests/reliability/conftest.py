"""A tiny model and two small real-data bundles (disjoint items) that the reliability suites serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def reliability_bundles(
    hm_slice: Any, build_slice_bundle: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """`a` holds the slice's first 32 H&M items, `b` the other 32: a result names the bundle it came from."""
    items, _ = hm_slice
    root = tmp_path_factory.mktemp("reliability-bundles")
    half = len(items.items) // 2
    return {
        "a": build_slice_bundle(items.items[:half], root / "a"),
        "b": build_slice_bundle(items.items[half:], root / "b"),
    }
