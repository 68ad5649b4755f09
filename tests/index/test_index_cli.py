"""`fashionbert index build|add|remove|info|verify` end to end, through the real patch-feature cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.cli import main
from index.bundle import Bundle


def test_index_commands(
    shared_data: Path, hm_slice, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    catalogue, _ = hm_slice  # fills the feature cache, so the CLI only reads it
    # A second catalogue in another format: two readable images, one that is not an image at all.
    folder = tmp_path / "extra"
    (folder / "images").mkdir(parents=True)
    for name, item in (("a.jpg", catalogue.items[0]), ("b.jpg", catalogue.items[1])):
        shutil.copy(item.image, folder / "images" / name)
    (folder / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        {"id": "extra-a", "text": "a copied image", "image": "images/a.jpg", "category": "Extra"},
        {"id": "extra-b", "text": "another copied image", "image": "images/b.jpg", "category": "Extra"},
        {"id": "extra-broken", "text": "an unreadable image", "image": "images/broken.jpg"},
    ]
    (folder / "catalogue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    hm, bundle = f"hm:{shared_data / 'hm'}", tmp_path / "bundle"
    common = ["--model", str(tiny_checkpoint), "--cache", str(feature_cache_dir), "--device", "cpu"]
    args = [
        "index",
        "build",
        *common,
        "--data",
        hm,
        "--limit",
        "20",
        "--data",
        f"jsonl:{folder / 'catalogue.jsonl'}",
    ]
    assert main([*args, "--out", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "22 items added" in out and "skipped 1 with unreadable images" in out

    assert main(["index", "info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert '"format_version": 1' in out and "patch_codes.npy" in out and "bytes/item" in out

    assert main(["index", "verify", str(bundle), "--model", str(tiny_checkpoint)]) == 0
    assert "ok:" in capsys.readouterr().out

    assert main(["index", "remove", str(bundle), "extra-a", "nope"]) == 0
    captured = capsys.readouterr()
    assert "1 items marked removed" in captured.out and "nope" in captured.err

    assert main(["index", "add", str(bundle), *common, "--data", hm, "--limit", "25"]) == 0
    assert "5 items added" in capsys.readouterr().out
    with Bundle.open(bundle) as opened:
        assert opened.size == 22 - 1 + 5 and opened.row_of("extra-a") is None
        assert opened.image_offsets is None  # plain inner product unless a querybank is given
    normalised = tmp_path / "normalised"
    # The bank: the second catalogue's two readable items (the unreadable one is skipped).
    bank = f"jsonl:{folder / 'catalogue.jsonl'}"
    small = ["index", "build", *common, "--data", hm, "--limit", "5", "--querybank-data", bank]
    assert main([*small, "--out", str(normalised)]) == 0
    with Bundle.open(normalised) as opened:
        assert len(opened.image_offsets) == opened.rows == 5
        assert opened.manifest["querybank"]["bank_items"] == 2
        assert opened.manifest["querybank"]["catalogue"]["name"] == "jsonl"

    other_model = tmp_path / "other-model"
    other_model.mkdir()
    (other_model / "model.safetensors").write_bytes(b"other weights")
    assert main(["index", "verify", str(bundle), "--model", str(other_model)]) == 1
    assert "rebuild" in capsys.readouterr().err
    (bundle / "token_ids.npy").write_bytes(b"\x93NUMPY tampered")
    assert main(["index", "verify", str(bundle)]) == 1
    assert "token_ids.npy" in capsys.readouterr().err


def test_build_refuses_an_unknown_catalogue_kind(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    argv = [
        "index",
        "build",
        "--model",
        str(tiny_checkpoint),
        "--data",
        "csv:x",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main([*argv, "--device", "cpu", "--cache", str(tmp_path / "cache")]) == 1
    assert "unknown catalogue kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "build"])  # argparse: missing required arguments
