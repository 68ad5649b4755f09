"""Catalogue readers on slices of the real data and on small generated files."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.catalogue import (
    Catalogue,
    CatalogueError,
    ImageError,
    load_catalogue,
    parse_spec,
)


def _write_jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 12), colour).save(path, format="JPEG")


# --- real data ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hm(shared_data: Path) -> Catalogue:
    return load_catalogue(f"hm:{shared_data / 'hm'}")


def test_hm_slice_keeps_leading_zeros_and_reads_text(shared_data: Path) -> None:
    catalogue = load_catalogue(f"hm:{shared_data / 'hm'}", limit=30)
    assert len(catalogue) == 30 and catalogue.name == "hm"
    assert catalogue[0].id == "0111565001"
    for item in catalogue:
        assert len(item.id) == 10 and item.id.startswith("0")
        assert item.text.startswith(item.title)
        assert item.metadata["colour_group_name"] in item.text
        assert item.subcategory in item.text
        assert item.group == item.id[:-3].lstrip("0")  # product_code is the article id without its variant
        assert Path(item.image).is_absolute() and Path(item.image).is_file()
    assert catalogue[1].text.startswith("Shape Up 30 den 1p Tights. Black Leggings/Tights. Tights with")
    image = catalogue.open_image(catalogue[0])
    assert image.mode == "RGB" and image.size == (256, 384)
    assert catalogue.image_bytes(catalogue[0]) == Path(catalogue[0].image).read_bytes()


def test_hm_split_is_deterministic_and_keeps_product_codes_apart(hm: Catalogue) -> None:
    assert len(hm) == 9967 and not hm.skipped
    assert sum(not item.metadata.get("detail_desc") for item in hm) == 7
    train, validation = hm.split(0.1, seed=0)
    again_train, again_validation = hm.split(0.1, seed=0)
    assert [i.id for i in train] == [i.id for i in again_train]
    assert [i.id for i in validation] == [i.id for i in again_validation]
    assert {i.id for i in train}.isdisjoint(i.id for i in validation)
    assert len(train) + len(validation) == len(hm)
    assert {i.group for i in train}.isdisjoint(i.group for i in validation)
    assert 0.07 < len(validation) / len(hm) < 0.13
    _, other_validation = hm.split(0.1, seed=1)
    assert {i.id for i in other_validation} != {i.id for i in validation}
    assert train.name == "hm" and train.source == hm.source
    assert train.open_image(train[0]).mode == "RGB"


def test_fingerprint_is_stable_and_follows_text(hm: Catalogue, shared_data: Path) -> None:
    again = load_catalogue(f"hm:{shared_data / 'hm'}", limit=len(hm))
    assert again.fingerprint() == hm.fingerprint()
    changed = hm.subset([dataclasses.replace(hm[0], text=hm[0].text + " Red."), *hm.items[1:]])
    assert changed.fingerprint() != hm.fingerprint()
    assert hm.subset(hm.items[:-1]).fingerprint() != hm.fingerprint()


def test_myntra_slice(shared_data: Path) -> None:
    catalogue = load_catalogue(f"myntra:{shared_data / 'myntra'}", limit=30)
    assert len(catalogue) == 30
    first = catalogue[0]
    assert first.id == "12783" and first.title == "Mother Earth Women Aug Bagru Red Kurtas"
    assert catalogue[1].text == "Diva Women Printed Green Kurta. Women Kurtas, Green, Summer, Ethnic"
    for item in catalogue:
        assert item.text.startswith(item.title)
        assert item.metadata["baseColour"] in item.text
        assert item.group == item.group.lower() and "  " not in item.group
        assert Path(item.image).is_file()
    image = catalogue.open_image(first)
    assert image.mode == "RGB" and image.size == (60, 80)


def test_myntra_full_reads_every_row(shared_data: Path) -> None:
    catalogue = load_catalogue(f"myntra:{shared_data / 'myntra'}")
    assert len(catalogue) == 39639 and not catalogue.skipped
    train, validation = catalogue.split(0.2, seed=3)
    assert {i.group for i in train}.isdisjoint(i.group for i in validation)
    assert "Apparel" in catalogue.summary()


def test_myntra_joins_extra_commas_into_the_title(tmp_path: Path) -> None:
    header = (
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    )
    rows = [
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Nike Men Blue T-Shirt",
        "2,Women,Footwear,Shoes,Heels,Black,Winter,,Party,Catwalk Women Black, Gold Heels, Size 5",
        "3,Men,Apparel,Topwear,Shirts,White,Fall,,Formal,No Image Shirt",
    ]
    (tmp_path / "styles.csv").write_text("\n".join([header, *rows]) + "\n")
    for style_id in ("1", "2"):
        _write_jpeg(tmp_path / "images" / f"{style_id}.jpg")
    catalogue = load_catalogue(f"myntra:{tmp_path}")
    assert [i.id for i in catalogue] == ["1", "2"]
    assert catalogue[1].title == "Catwalk Women Black, Gold Heels, Size 5"
    assert catalogue[1].group == "catwalk women black gold heels size 5"
    assert catalogue[1].metadata["usage"] == "Party"
    assert catalogue.skipped == {"image not found": 1}


# --- JSON lines --------------------------------------------------------------------------------------------


def test_jsonl_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "b.jpg").write_bytes(b"not a jpeg at all")
    records = [
        {"id": "a", "text": "A red wool coat with a wide collar and two deep pockets", "image": "images/a.jpg",
         "category": "Coats", "price": 12.5, "colour": "red"},
        {"id": 7, "text": "Corrupt picture", "image": "images/b.jpg", "group": "g1", "title": "Broken"},
        {"id": "c", "text": "Missing picture", "image": "images/c.jpg"},
        {"id": "d", "text": "Another missing picture", "image": "images/d.jpg"},
        {"id": "e", "image": "images/a.jpg"},
    ]  # fmt: skip
    lines = [json.dumps(r) for r in records]
    (tmp_path / "items.jsonl").write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n")

    with caplog.at_level(logging.WARNING, logger="model.catalogue"):
        catalogue = load_catalogue(f"jsonl:{tmp_path / 'items.jsonl'}")
    assert [i.id for i in catalogue] == ["a", "7"]
    assert catalogue.skipped == {"image not found": 2, "missing text": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and sum("image not found" in w for w in warnings) == 1

    coat, corrupt = catalogue[0], catalogue[1]
    assert coat.image == str(tmp_path.resolve() / "images" / "a.jpg")
    assert coat.title == "A red wool coat with a wide collar"
    assert coat.group == "a" and coat.category == "Coats" and coat.subcategory == ""
    assert coat.metadata == {"price": "12.5", "colour": "red"}
    assert corrupt.group == "g1" and corrupt.title == "Broken"
    assert catalogue.open_image(coat).mode == "RGB"
    assert catalogue.image_bytes(coat) == (tmp_path / "images" / "a.jpg").read_bytes()
    with pytest.raises(ImageError, match="7"):
        catalogue.open_image(corrupt)
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(ImageError):
        catalogue.open_image(coat)
    assert "skipped 3 rows" in catalogue.summary()


# --- Fashion-Gen HDF5 --------------------------------------------------------------------------------------


def _write_fashiongen(path: Path) -> np.ndarray:
    h5py = pytest.importorskip("h5py")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    columns = {
        "input_productID": [b"100", b"100", b"200"],
        "input_name": [b"WOOL COAT", b"WOOL COAT", "CAF\u00c9 SCARF".encode("latin-1")],
        "input_description": [b"Long coat in wool.", b"Long coat in wool.", b"Scarf in silk."],
        "input_category": [b"JACKETS & COATS", b"JACKETS & COATS", b"SCARVES"],
        "input_subcategory": [b"COATS", b"COATS", b"SCARVES"],
        "input_gender": [b"MEN", b"MEN", b"WOMEN"],
        "input_composition": [b"100% wool", b"100% wool", "100% soie \u00e9".encode()],
    }
    with h5py.File(path, "w") as h5:
        h5["input_image"] = images
        for name, values in columns.items():
            h5[name] = np.array(values, dtype="S").reshape(-1, 1)
    return images


def test_fashiongen_reader(tmp_path: Path) -> None:
    path = tmp_path / "fashiongen_256_256_validation.h5"
    images = _write_fashiongen(path)
    catalogue = load_catalogue(f"fashiongen:{path}")
    assert [i.id for i in catalogue] == ["100_0", "100_1", "200_2"]
    coat, scarf = catalogue[0], catalogue[2]
    assert coat.text == "WOOL COAT. Long coat in wool." and coat.title == "WOOL COAT"
    assert scarf.title == "CAF\u00c9 SCARF"
    assert coat.group == "100" and coat.category == "JACKETS & COATS" and coat.subcategory == "COATS"
    assert scarf.metadata == {"gender": "WOMEN", "composition": "100% soie \u00e9"}
    assert scarf.image == f"{path.resolve()}#2"
    assert catalogue.image_bytes(scarf) == images[2].tobytes()
    image = catalogue.open_image(catalogue[1])
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), images[1])
    # Open HDF5 handles must not travel with a pickled catalogue (DataLoader workers).
    restored = pickle.loads(pickle.dumps(catalogue))
    assert np.array_equal(np.asarray(restored.open_image(scarf)), images[2])
    train, validation = catalogue.split(0.5, seed=0)
    assert {i.group for i in train}.isdisjoint(i.group for i in validation)
    assert len(load_catalogue(f"fashiongen:{path}", limit=1)) == 1


def test_fashiongen_without_h5py_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CatalogueError, match="pip install h5py"):
        load_catalogue(f"fashiongen:{tmp_path / 'x.h5'}")


# --- bad input ---------------------------------------------------------------------------------------------


def test_parse_spec() -> None:
    assert parse_spec("hm:data/hm") == ("hm", Path("data/hm"))
    for spec in ("nope:data", "data/hm", "hm:"):
        with pytest.raises(CatalogueError):
            parse_spec(spec)


def test_missing_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="images"):
        load_catalogue(f"hm:{tmp_path}")
    (tmp_path / "images").mkdir()
    with pytest.raises(CatalogueError, match="articles.csv"):
        load_catalogue(f"hm:{tmp_path}")
    with pytest.raises(CatalogueError, match="styles.csv"):
        load_catalogue(f"myntra:{tmp_path}", limit=0)
    with pytest.raises(CatalogueError, match="items.jsonl"):
        load_catalogue(f"jsonl:{tmp_path / 'items.jsonl'}")


def test_wrongly_shaped_files_name_the_file_and_problem(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "articles.csv").write_text("article_id,product_code,prod_name\n0111565001,111565,Tights\n")
    with pytest.raises(CatalogueError, match=r"articles.csv: missing columns \[.*'detail_desc'\]"):
        load_catalogue(f"hm:{tmp_path}")
    (tmp_path / "styles.csv").write_bytes(b"\xff\xd8\xff\xe0 binary")
    with pytest.raises(CatalogueError, match="styles.csv"):
        load_catalogue(f"myntra:{tmp_path}")
    (tmp_path / "items.jsonl").write_text("id,text,image\n1,a,b.jpg\n")
    with pytest.raises(CatalogueError, match="items.jsonl.*not JSON"):
        load_catalogue(f"jsonl:{tmp_path / 'items.jsonl'}")
    pytest.importorskip("h5py")
    (tmp_path / "data.h5").write_text("not hdf5")
    with pytest.raises(CatalogueError, match="data.h5"):
        load_catalogue(f"fashiongen:{tmp_path / 'data.h5'}")


def test_catalogue_with_no_usable_rows_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "text": "x", "image": "gone.jpg"}) + "\n")
    with pytest.raises(CatalogueError, match="image not found 1"):
        load_catalogue(f"jsonl:{tmp_path / 'items.jsonl'}")
    assert len(load_catalogue(f"jsonl:{tmp_path / 'items.jsonl'}", limit=0)) == 0
