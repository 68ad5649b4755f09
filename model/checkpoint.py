"""A checkpoint is a folder: config.json, model.safetensors, the tokenizer files and summary.json."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.config import FashionBertConfig
from model.fashionbert import FashionBert
from model.files import replace_folder

CONFIG_FILE, WEIGHTS_FILE, SUMMARY_FILE = "config.json", "model.safetensors", "summary.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or does not fit its config."""


def save_checkpoint(
    model: FashionBert, tokenizer: PreTrainedTokenizerBase, out: str | Path, summary: dict[str, Any]
) -> Path:
    """Write the checkpoint into a temporary sibling folder, then rename it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.to_json(tmp / CONFIG_FILE)
        save_model(model, str(tmp / WEIGHTS_FILE))
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint(path: str | Path) -> tuple[FashionBert, PreTrainedTokenizerBase]:
    """Rebuild the model and tokenizer from a checkpoint folder, with clear errors for bad folders."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {missing}")
    try:
        config = FashionBertConfig.from_json(path / CONFIG_FILE)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a FashionBertConfig ({error})") from error
    if not config.bert:
        raise CheckpointError(f"{path / CONFIG_FILE}: has no BERT config")
    model = FashionBert(config)
    try:
        model.load_state_dict(_renamed_legacy_keys(load_file(path / WEIGHTS_FILE)), strict=True)
    except Exception as error:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path / WEIGHTS_FILE}: weights do not fit the config ({error})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:
        raise CheckpointError(f"{path}: tokenizer files are missing or unreadable ({error})") from error
    model.eval()
    return model, tokenizer


# Checkpoints written before image-tower ensembles held their one image tower under these names.
_LEGACY_PREFIXES = {
    "image_projection.": "image_towers.0.projection.",
    "image_colour_projection.": "image_towers.0.colour.",
}
# Checkpoints written before the towers' weights were stacked (model.fashionbert.StackedMLP) held each
# member as `image_towers.<member>.<path>.<layer>.<weight|bias>`, an `nn.Sequential` each.
_MEMBER_KEY = re.compile(r"image_towers\.(\d+)\.(projection|colour)\.(\d)\.(weight|bias)")
_STACKED_NAMES = {
    ("0", "weight"): "norm_weight",
    ("0", "bias"): "norm_bias",
    ("1", "weight"): "weight1",  # nn.Linear's are (out, in): stacked transposed
    ("1", "bias"): "bias1",
    ("3", "weight"): "weight2",
    ("3", "bias"): "bias2",
}


def _renamed_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    renamed: dict[str, Any] = {}
    members: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        for old, new in _LEGACY_PREFIXES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        if match := _MEMBER_KEY.fullmatch(key):
            member, path, layer, kind = match.groups()
            name = f"image_towers.{path}.{_STACKED_NAMES[layer, kind]}"
            members[name][int(member)] = value.T if layer != "0" and kind == "weight" else value
        else:
            renamed[key] = value
    for name, by_member in members.items():
        renamed[name] = torch.stack([by_member[k] for k in sorted(by_member)])
    return renamed


def read_summary(path: str | Path) -> dict[str, Any]:
    file = Path(path) / SUMMARY_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
