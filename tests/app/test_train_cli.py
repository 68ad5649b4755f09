"""`fashionbert features` and `train` at a photo size of the caller's: the features and the checkpoint follow it."""

from __future__ import annotations

import json
from pathlib import Path

from app.cli import main


def test_image_size_reaches_the_feature_cache_and_the_trained_checkpoint(
    shared_data: Path, tmp_path: Path
) -> None:
    data, cache = f"hm:{shared_data / 'hm'}", tmp_path / "cache"
    assert (
        main(["features", "--data", data, "--limit", "24", "--cache", str(cache), "--image-size", "128"]) == 0
    )
    (note,) = cache.glob("*/extractor.json")  # one extractor's folder: the 128-pixel one
    assert json.loads(note.read_text())["config"]["image_size"] == 128
    assert len(list(note.parent.glob("*/*.npy"))) == 24

    out = tmp_path / "run"
    args = ["train", "--data", data, "--limit", "24", "--cache", str(cache), "--out", str(out), "--tiny"]
    assert main([*args, "--steps", "1", "--batch-size", "8", "--image-size", "128"]) == 0
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["patch_features"]["image_size"] == 128  # what serving will letterbox query photos to
