"""The content-addressed patch-feature cache on small generated catalogues with the real (small) extractor."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import model.feature_cache as feature_cache_module
from model.catalogue import Catalogue, Item
from model.feature_cache import FeatureCache, image_key
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

SMALL = PatchFeatureConfig(image_size=32, grid=2, feature_layer="blocks")  # (4, 320) features, fast


class CountingExtractor(PatchFeatureExtractor):
    """Counts the batches and images that really go through the network, and every decode."""

    def __init__(self, config: PatchFeatureConfig) -> None:
        super().__init__(config)
        self.batches = self.images = self.preprocessed = 0

    def extract_pixels(self, pixels: np.ndarray, autocast: bool = True) -> np.ndarray:
        self.batches += 1
        self.images += len(pixels)
        return super().extract_pixels(pixels, autocast=autocast)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        self.preprocessed += 1
        return super().preprocess(image)


@pytest.fixture(scope="module")
def extractor() -> CountingExtractor:
    return CountingExtractor(SMALL)


@pytest.fixture(autouse=True)
def reset_counts(extractor: CountingExtractor) -> None:
    extractor.batches = extractor.images = extractor.preprocessed = 0


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (24, 36)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], colour[2], colour[1]), (4, 4, 12, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _catalogue(folder: Path, images: dict[str, bytes | None]) -> Catalogue:
    """One item per id; None writes no file at all (a missing image)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for item_id, data in images.items():
        path = folder / f"{item_id}.png"
        if data is not None:
            path.write_bytes(data)
        items.append(Item(item_id, f"text {item_id}", item_id, str(path), "cat", "sub", item_id))
    return Catalogue("jsonl", str(folder), items)


def _colours(n: int) -> list[tuple[int, int, int]]:
    return [(40 * i % 256, 255 - 30 * i % 256, 90 + 50 * i % 166) for i in range(n)]


def test_miss_then_hit(tmp_path: Path, extractor: CountingExtractor) -> None:
    cache = FeatureCache(tmp_path / "cache", extractor)
    data = _png((200, 30, 30))
    assert cache.get(data) is None
    features = np.random.default_rng(0).standard_normal((4, 320)).astype(np.float32)
    cache.put(data, features)
    stored = cache.get(data)
    assert stored is not None and stored.dtype == np.float16 and stored.shape == (4, 320)
    np.testing.assert_allclose(stored, features, rtol=1e-3, atol=1e-3)
    assert cache.path(image_key(data)).parent.parent == cache.folder


def test_second_pass_reads_the_cache_without_decoding_or_running_the_network(
    tmp_path: Path, extractor: CountingExtractor
) -> None:
    catalogue = _catalogue(tmp_path / "images", {f"a{i}": _png(c) for i, c in enumerate(_colours(5))})
    cache = FeatureCache(tmp_path / "cache", extractor)
    kept, first = cache.features_for(catalogue, batch_size=2, progress=False)
    assert kept is catalogue and first.shape == (5, 4, 320) and first.dtype == np.float16
    assert (extractor.batches, extractor.images) == (3, 5)

    extractor.batches = extractor.images = extractor.preprocessed = 0
    again, second = FeatureCache(tmp_path / "cache", extractor).features_for(catalogue, progress=False)
    assert (extractor.batches, extractor.images, extractor.preprocessed) == (0, 0, 0)
    assert [item.id for item in again] == [item.id for item in catalogue]
    np.testing.assert_array_equal(first, second)


def test_features_match_direct_extraction_in_catalogue_order(
    tmp_path: Path, extractor: CountingExtractor
) -> None:
    images = {f"b{i}": _png(c) for i, c in enumerate(_colours(3))}
    _, features = FeatureCache(tmp_path / "cache", extractor).features_for(
        _catalogue(tmp_path / "images", images), batch_size=2, progress=False
    )
    direct = extractor.extract([Image.open(io.BytesIO(data)) for data in images.values()])
    np.testing.assert_allclose(features, direct, rtol=2e-2, atol=2e-2)
    assert not np.allclose(features[0], features[1], atol=1e-2), "different images, different rows"


def test_changed_extractor_config_uses_another_folder(tmp_path: Path, extractor: CountingExtractor) -> None:
    data = _png((10, 200, 10))
    cache = FeatureCache(tmp_path / "cache", extractor)
    cache.put(data, np.zeros((4, 320), dtype=np.float32))
    other = FeatureCache(tmp_path / "cache", PatchFeatureExtractor(PatchFeatureConfig(image_size=32, grid=4)))
    assert other.folder != cache.folder and other.folder.parent == cache.folder.parent
    assert other.get(data) is None
    assert (cache.folder / "extractor.json").is_file()


def test_corrupt_entry_is_removed_and_recomputed(
    tmp_path: Path, extractor: CountingExtractor, caplog: pytest.LogCaptureFixture
) -> None:
    data = _png((120, 120, 250))
    catalogue = _catalogue(tmp_path / "images", {"c0": data})
    cache = FeatureCache(tmp_path / "cache", extractor)
    _, good = cache.features_for(catalogue, progress=False)
    entry = cache.path(image_key(data))
    entry.write_bytes(b"\x93NUMPY garbage that is not an array")

    with caplog.at_level(logging.WARNING, logger="model.feature_cache"):
        assert cache.get(data) is None
    assert not entry.exists() and "corrupt" in caplog.text

    extractor.images = 0
    _, again = cache.features_for(catalogue, progress=False)
    assert extractor.images == 1 and entry.exists()
    np.testing.assert_array_equal(again, good)


def test_wrong_shaped_entry_is_a_miss(tmp_path: Path, extractor: CountingExtractor) -> None:
    data = _png((1, 2, 3))
    cache = FeatureCache(tmp_path / "cache", extractor)
    entry = cache.path(image_key(data))
    entry.parent.mkdir(parents=True)
    np.save(entry, np.zeros((64, 1280), dtype=np.float16))
    assert cache.get(data) is None and not entry.exists()


def test_put_rejects_wrong_shapes(tmp_path: Path, extractor: CountingExtractor) -> None:
    with pytest.raises(ValueError, match="must be"):
        FeatureCache(tmp_path / "cache", extractor).put(b"x", np.zeros((64, 1280), dtype=np.float32))


def test_half_written_temp_file_is_never_read(tmp_path: Path, extractor: CountingExtractor) -> None:
    data = _png((7, 77, 177))
    cache = FeatureCache(tmp_path / "cache", extractor)
    entry = cache.path(image_key(data))
    entry.parent.mkdir(parents=True)
    # A writer that died mid-way leaves only its temp file, never the entry's own name.
    (entry.parent / f".{entry.name}.dead.tmp").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f2'")
    assert cache.get(data) is None


def test_failed_put_leaves_neither_entry_nor_temp_file(
    tmp_path: Path, extractor: CountingExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _png((50, 60, 70))
    cache = FeatureCache(tmp_path / "cache", extractor)

    def dies_half_way(f, array, allow_pickle: bool = False) -> None:
        f.write(b"\x93NUMPY\x01\x00")
        raise OSError("disk full")

    monkeypatch.setattr(feature_cache_module.np, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        cache.put(data, np.zeros((4, 320), dtype=np.float32))
    monkeypatch.undo()
    assert cache.get(data) is None
    assert list(cache.path(image_key(data)).parent.iterdir()) == []


def test_unreadable_images_are_skipped_with_one_warning(
    tmp_path: Path, extractor: CountingExtractor, caplog: pytest.LogCaptureFixture
) -> None:
    colours = _colours(3)
    images = {
        "ok0": _png(colours[0]),
        "corrupt": b"\x89PNG\r\n\x1a\n not really a png",
        "ok1": _png(colours[1]),
        "missing": None,
        "ok2": _png(colours[2]),
    }
    catalogue = _catalogue(tmp_path / "images", images)
    cache = FeatureCache(tmp_path / "cache", extractor)
    with caplog.at_level(logging.WARNING, logger="model.feature_cache"):
        kept, features = cache.features_for(catalogue, batch_size=2, progress=False)

    assert [item.id for item in kept] == ["ok0", "ok1", "ok2"]
    assert features.shape == (3, 4, 320)
    for item, row in zip(kept, features, strict=True):
        np.testing.assert_array_equal(row, cache.get(images[item.id]))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 5" in warnings[0].getMessage() and "corrupt, missing" in warnings[0].getMessage()


def test_identical_images_go_through_the_network_once(tmp_path: Path, extractor: CountingExtractor) -> None:
    same = _png((33, 66, 99))
    catalogue = _catalogue(tmp_path / "images", {"d0": same, "d1": _png((99, 66, 33)), "d2": same})
    _, features = FeatureCache(tmp_path / "cache", extractor).features_for(
        catalogue, batch_size=8, progress=False
    )
    assert extractor.images == 2
    np.testing.assert_array_equal(features[0], features[2])


def test_raw_array_images_fall_back_to_the_catalogue(tmp_path: Path, extractor: CountingExtractor) -> None:
    class RawArrayCatalogue(Catalogue):
        """Like an HDF5 catalogue: image_bytes are raw pixels, only open_image can decode them."""

        def image_bytes(self, item: Item) -> bytes:
            return np.full((8, 8, 3), int(item.id), dtype=np.uint8).tobytes()

        def open_image(self, item: Item) -> Image.Image:
            return Image.fromarray(np.full((8, 8, 3), int(item.id), dtype=np.uint8))

    items = [Item(str(v), "t", "t", f"raw#{v}", "c", "s", str(v)) for v in (10, 200)]
    kept, features = FeatureCache(tmp_path / "cache", extractor).features_for(
        RawArrayCatalogue("raw", "raw", items), progress=False
    )
    assert len(kept) == 2 and features.shape == (2, 4, 320)
    assert not np.allclose(features[0], features[1])


def test_a_view_is_cached_apart_and_holds_the_features_of_the_photo_so_seen(
    tmp_path: Path, extractor: CountingExtractor
) -> None:
    photos = {f"v{i}": _png(c) for i, c in enumerate(_colours(3))}
    mirrored = {}
    for item_id, data in photos.items():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, format="PNG")
        mirrored[f"m{item_id}"] = buffer.getvalue()
    catalogue = _catalogue(tmp_path / "photos", photos)
    plain = FeatureCache(tmp_path / "cache", extractor)
    flipped = FeatureCache(tmp_path / "cache", extractor, view="flip")
    assert flipped.folder.name == f"{plain.folder.name}-flip"
    assert json.loads((flipped.folder / "extractor.json").read_text())["view"] == "flip"

    _, seen_flipped = flipped.features_for(catalogue, progress=False)
    _, of_mirrored = plain.features_for(_catalogue(tmp_path / "mirrored", mirrored), progress=False)
    np.testing.assert_array_equal(seen_flipped, of_mirrored)
    _, of_photos = plain.features_for(catalogue, progress=False)
    assert not np.allclose(of_photos, seen_flipped, atol=1e-2), "the plain entries are the photos' own"

    extractor.images = 0
    _, again = FeatureCache(tmp_path / "cache", extractor, view="flip").features_for(
        catalogue, progress=False
    )
    assert extractor.images == 0
    np.testing.assert_array_equal(again, seen_flipped)
    with pytest.raises(ValueError, match="unknown view"):
        FeatureCache(tmp_path / "cache", extractor, view="blur")
