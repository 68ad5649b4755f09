"""`fashionbert eval` end to end on the real H&M slice: the report, with and without a querybank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main


def test_eval_with_and_without_a_train_split_bank(
    shared_data: Path, hm_slice, feature_cache_dir: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    catalogue, _ = hm_slice  # fills the feature cache, so the command only reads it
    args = ["eval", "--model", str(tiny_checkpoint), "--data", f"hm:{shared_data / 'hm'}", "--limit", "64"]
    args += ["--cache", str(feature_cache_dir), "--device", "cpu", "--negatives", "3", "--recall-k", "4"]
    train, validation = catalogue.split()
    assert main([*args, "--querybank", "--report", str(tmp_path / "qb.json")]) == 0
    assert "image -> text" in capsys.readouterr().out
    served = json.loads((tmp_path / "qb.json").read_text())
    assert served["sampled/querybank_size"] == served["gallery/querybank_size"] == len(train)
    assert served["gallery/size"] == len(validation)

    assert main([*args, "--report", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["sampled/querybank_size"] == plain["gallery/querybank_size"] == 0
    # The same queries and candidates, scored two ways.
    assert plain["sampled/queries"] == served["sampled/queries"] and plain["gallery/size"] == len(validation)
    with pytest.raises(SystemExit, match="train split"):  # its bank would hold the queries
        main([*args, "--querybank", "--split", "all"])
