"""The generated catalogue: deterministic, readable as a jsonl catalogue, pictures that match their words."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.catalogue import load_catalogue
from model.synthetic import (
    BACKGROUND,
    CATALOGUE_FILE,
    COLOURS,
    GARMENTS,
    PATTERNS,
    SyntheticConfig,
    write_catalogue,
)

CONFIG = SyntheticConfig(items=48, seed=3, width=96, height=128)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("synthetic") / "catalogue", CONFIG)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_catalogue(generated: Path, tmp_path: Path) -> None:
    again = write_catalogue(tmp_path / "again", CONFIG)
    assert _files(again.parent) == _files(generated.parent)
    other = write_catalogue(tmp_path / "other", SyntheticConfig(items=48, seed=4, width=96, height=128))
    assert other.read_text() != generated.read_text()


def test_reads_as_a_jsonl_catalogue(generated: Path) -> None:
    catalogue = load_catalogue(f"jsonl:{generated}")
    assert len(catalogue) == CONFIG.items
    assert not catalogue.skipped
    item = catalogue[0]
    assert Path(item.image).is_file() and item.title in item.text
    assert item.metadata["colour"] in item.text.lower() and item.metadata["pattern"] in PATTERNS
    # Every garment type, in equal numbers; colour variants of one design share a product group.
    counts = collections.Counter(item.subcategory for item in catalogue)
    assert counts == {garment.name: CONFIG.items // len(GARMENTS) for garment in GARMENTS}
    assert len({item.category for item in catalogue}) == len({g.category for g in GARMENTS}) == 5
    train, validation = catalogue.split(val_fraction=0.2)
    assert {i.group for i in train}.isdisjoint({i.group for i in validation})


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    names = sorted(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)  # (C, 3)
    distance = ((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1)  # (P, C)
    return np.array(names)[distance.argmin(axis=1)]


def test_each_image_shows_the_colour_its_text_names(generated: Path) -> None:
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    for record in records:
        pixels = np.asarray(Image.open(generated.parent / record["image"]).convert("RGB")).reshape(-1, 3)
        garment = pixels[(pixels != BACKGROUND).any(axis=1)]
        assert len(garment) > 0.1 * len(pixels), f"{record['id']}: the garment covers too little"
        dominant, count = collections.Counter(_nearest_colour(garment)).most_common(1)[0]
        assert dominant == record["colour"], f"{record['id']} ({record['title']}): looks {dominant}"
        assert count > 0.5 * len(garment)
        colour_word = record["title"].split()[0].lower()
        assert colour_word == record["colour"] and record["text"].lower().startswith(colour_word)
        assert record["subcategory"] in record["title"]


def test_patterns_differ_in_the_picture(generated: Path) -> None:
    """A solid garment is one colour; a patterned one shows a second colour in a good share of pixels."""
    for record in (json.loads(line) for line in generated.read_text().splitlines()):
        pixels = np.asarray(Image.open(generated.parent / record["image"]).convert("RGB")).reshape(-1, 3)
        shares = collections.Counter(_nearest_colour(pixels[(pixels != BACKGROUND).any(axis=1)]))
        second = sorted(shares.values())[-2] / sum(shares.values()) if len(shares) > 1 else 0.0
        if record["pattern"] == "solid":
            assert second == 0.0, record["id"]
        else:
            assert second > 0.05, record["id"]


def test_existing_catalogue_is_kept_and_a_new_config_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    path = write_catalogue(out, SyntheticConfig(items=8, width=48, height=64))
    stamp = path.stat().st_mtime_ns
    assert write_catalogue(out, SyntheticConfig(items=8, width=48, height=64)) == path
    assert path.stat().st_mtime_ns == stamp
    write_catalogue(out, SyntheticConfig(items=16, width=48, height=64))
    assert len(path.read_text().splitlines()) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"], "no temporary folders left behind"
    assert (out / CATALOGUE_FILE).is_file()
