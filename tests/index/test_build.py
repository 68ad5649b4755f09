"""The jobs: incremental add and remove show in search, failures and kills never leave a bundle that loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import index.build
from index.build import add_to_bundle, build_bundle, remove_from_bundle
from index.bundle import IMAGE_INDEX, PATCH_CODEC, Bundle, BundleError, file_sha256
from index.config import IndexConfig
from tests.index.conftest import BASE_ITEMS, TEST_CONFIG, StubEncoder, synthetic_catalogue, synthetic_features

REPO = Path(__file__).resolve().parents[2]


def test_add_makes_new_items_findable_without_retraining(
    bundle_copy: Callable[[], Path], hm_slice, tiny_inference, slice_features
) -> None:
    catalogue, features = hm_slice
    path = bundle_copy()
    codec_before = file_sha256(path / PATCH_CODEC)
    # The whole slice: the first 48 are already indexed and skipped, the last 16 are new.
    report = add_to_bundle(tiny_inference, path, catalogue, slice_features, progress=False)
    assert (report.added, report.skipped_duplicate, report.rows) == (
        len(catalogue) - BASE_ITEMS,
        BASE_ITEMS,
        len(catalogue),
    )
    with Bundle.open(path, tiny_inference.fingerprint) as bundle:
        assert bundle.size == len(catalogue)
        assert file_sha256(path / PATCH_CODEC) == codec_before, "add must reuse the trained codec"
        new = np.arange(BASE_ITEMS, len(catalogue))
        _, rows = bundle.search_images(tiny_inference.encode_images(features[new]), k=1)
        np.testing.assert_array_equal(rows[:, 0], new)
        assert [item["id"] for item in bundle.items(new)] == [
            item.id for item in catalogue.items[BASE_ITEMS:]
        ]
        assert bundle.manifest["history"][-1]["op"] == "add" and len(bundle.manifest["catalogues"]) == 2
    again = add_to_bundle(tiny_inference, path, catalogue, slice_features, progress=False)
    assert again.added == 0 and again.skipped_duplicate == len(catalogue)


def test_removed_items_never_come_back(bundle_copy: Callable[[], Path], hm_slice, tiny_inference) -> None:
    catalogue, features = hm_slice
    path = bundle_copy()
    gone = [catalogue.items[i].id for i in (0, 3, 4)]
    report = remove_from_bundle(path, [*gone, "no-such-id"])
    assert report.removed == gone and report.unknown == ["no-such-id"]
    with Bundle.open(path) as bundle:
        assert bundle.size == BASE_ITEMS - 3 and bundle.manifest["counts"]["removed"] == 3
        assert bundle.row_of(gone[0]) is None and bundle.item(gone[0]) is None
        queries = tiny_inference.encode_images(features[:BASE_ITEMS])
        for search in (bundle.search_images, bundle.search_texts):
            _, rows = search(queries, k=BASE_ITEMS)
            assert not {0, 3, 4} & set(rows.ravel().tolist())
            assert np.all((rows >= 0).sum(1) == BASE_ITEMS - 3)
        assert 0 not in bundle.rows_matching({"category": catalogue.items[0].category}).tolist()
    assert remove_from_bundle(path, gone).removed == []  # already removed: nothing to do


def test_restocked_item_gets_a_new_row(tmp_path: Path) -> None:
    encoder, features = StubEncoder(), synthetic_features()
    path = tmp_path / "bundle"
    build_bundle(encoder, synthetic_catalogue(40), features, path, TEST_CONFIG, progress=False)
    remove_from_bundle(path, ["item-000005"])
    report = add_to_bundle(encoder, path, synthetic_catalogue(1, start=5), features, progress=False)
    assert report.added == 1
    with Bundle.open(path) as bundle:
        assert bundle.row_of("item-000005") == 40 and bundle.size == 40


def test_unreadable_items_are_skipped_and_counted(tmp_path: Path) -> None:
    unreadable = frozenset({"item-000002", "item-000007"})
    report = build_bundle(
        StubEncoder(),
        synthetic_catalogue(30),
        synthetic_features(unreadable=unreadable),
        tmp_path / "b",
        TEST_CONFIG,
        progress=False,
    )
    assert (report.rows, report.skipped_unreadable) == (28, 2)
    with Bundle.open(tmp_path / "b") as bundle:
        assert bundle.manifest["counts"]["skipped_unreadable"] == 2
        assert bundle.row_of("item-000002") is None and bundle.row_of("item-000003") == 2


def test_nothing_readable_is_refused(tmp_path: Path) -> None:
    ids = frozenset(f"item-{i:06d}" for i in range(5))
    with pytest.raises(BundleError, match="readable"):
        build_bundle(
            StubEncoder(),
            synthetic_catalogue(5),
            synthetic_features(unreadable=ids),
            tmp_path / "b",
            TEST_CONFIG,
            progress=False,
        )
    assert not (tmp_path / "b").exists()


def test_add_refuses_another_model(bundle_copy: Callable[[], Path], hm_slice) -> None:
    path = bundle_copy()
    with pytest.raises(BundleError, match="another space|rebuild"):
        add_to_bundle(StubEncoder(), path, synthetic_catalogue(3), synthetic_features(), progress=False)


def _fail_while_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path, manifest: dict) -> None:
        assert (folder / IMAGE_INDEX).exists(), "the failure should come after files were written"
        raise OSError("disk full")

    monkeypatch.setattr(index.build, "_write_manifest", fail)


def test_failed_build_leaves_no_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_while_writing(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        build_bundle(
            StubEncoder(),
            synthetic_catalogue(20),
            synthetic_features(),
            tmp_path / "b",
            TEST_CONFIG,
            progress=False,
        )
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".b.lock"]  # no staging folder left behind
    with pytest.raises(BundleError):
        Bundle.open(tmp_path / "b")


def test_failed_update_keeps_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b"
    build_bundle(
        StubEncoder(), synthetic_catalogue(20), synthetic_features(), path, TEST_CONFIG, progress=False
    )
    _fail_while_writing(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        add_to_bundle(
            StubEncoder(), path, synthetic_catalogue(5, start=20), synthetic_features(), progress=False
        )
    with pytest.raises(OSError, match="disk full"):
        remove_from_bundle(path, ["item-000001"])
    with Bundle.open(path) as bundle:
        assert bundle.size == 20 and bundle.row_of("item-000001") == 1


KILLED_BUILD = """
import sys, time
from pathlib import Path
from index.build import build_bundle
from tests.index.conftest import TEST_CONFIG, StubEncoder, synthetic_catalogue, synthetic_features

source, calls = synthetic_features(), []
def slow_source(catalogue):
    calls.append(1)
    if len(calls) == 3:  # codec sample, first chunk, then hang inside the second chunk
        Path(sys.argv[2]).touch()
        time.sleep(600)
    return source(catalogue)

build_bundle(StubEncoder(), synthetic_catalogue(100), slow_source, sys.argv[1], TEST_CONFIG, progress=False)
"""


def test_killed_build_leaves_nothing_that_loads(tmp_path: Path) -> None:
    target, midway = tmp_path / "bundle", tmp_path / "midway"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(target), str(midway)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not midway.exists():
            assert process.poll() is None, "the build exited before it was killed"
            assert time.monotonic() < deadline, "the build never got midway"
            time.sleep(0.05)
        staging = list(tmp_path.glob(".bundle.staging-*"))
        assert staging and any(staging[0].iterdir()), "files should be half-written when the kill comes"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not target.exists()
    with pytest.raises(BundleError):
        Bundle.open(target)
    with pytest.raises(BundleError, match="did not finish"):
        Bundle.open(staging[0])
    # The next job on that bundle clears the leftover and succeeds.
    build_bundle(
        StubEncoder(), synthetic_catalogue(10), synthetic_features(), target, TEST_CONFIG, progress=False
    )
    assert not list(tmp_path.glob(".bundle.staging-*"))
    assert Bundle.open(target).size == 10


def test_rebuild_replaces_in_one_step_while_a_reader_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "b"
    build_bundle(
        StubEncoder(), synthetic_catalogue(20), synthetic_features(), path, TEST_CONFIG, progress=False
    )
    old = Bundle.open(path)
    build_bundle(
        StubEncoder(), synthetic_catalogue(30), synthetic_features(), path, TEST_CONFIG, progress=False
    )
    assert Bundle.open(path).size == 30
    assert old.size == 20 and old.items([19])[0]["id"] == "item-000019"  # open files outlive the swap
    assert old.patch_features([0]).shape == (1, 4, 32)


def test_index_config_round_trips_and_checks() -> None:
    config = IndexConfig(nprobe=8, refine="Flat")
    assert IndexConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="refine"):
        IndexConfig(refine="bogus")
    with pytest.raises(ValueError, match="unknown"):
        IndexConfig.from_dict({"nlist": 3})


def test_each_distinct_text_goes_through_the_tower_once() -> None:
    class Recording:
        def __init__(self) -> None:
            self.seen: list[tuple[int, ...]] = []

        def encode_token_ids(self, token_ids, batch_size: int = 256) -> np.ndarray:
            self.seen += [tuple(ids) for ids in token_ids]
            return np.array([[len(ids), sum(ids)] for ids in token_ids], np.float32)

        def encode_token_ids_with_states(self, token_ids, batch_size: int = 256):
            """States that spell out each text's ids, so a row mixed up with another shows."""
            longest = max(len(ids) for ids in token_ids)
            states = np.zeros((len(token_ids), longest, 1), np.float16)
            for row, ids in enumerate(token_ids):
                states[row, : len(ids), 0] = ids
            mask = np.arange(longest) < np.array([len(ids) for ids in token_ids])[:, None]
            return self.encode_token_ids(token_ids, batch_size), states, mask

    token_ids = [[1, 5, 2], [1, 7, 8, 2], [1, 5, 2], [1, 2], [1, 7, 8, 2]]
    expected = np.array([[len(ids), sum(ids)] for ids in token_ids], np.float32)
    for with_states in (False, True):
        encoder = Recording()
        embeddings, states = index.build._encode_texts(encoder, token_ids, 2, with_states=with_states)
        assert sorted(encoder.seen) == sorted({tuple(ids) for ids in token_ids})  # three distinct, once each
        assert [len(ids) for ids in encoder.seen] == [2, 3, 4]  # shortest first
        np.testing.assert_array_equal(embeddings, expected)  # every row its own text's embedding
        if not with_states:
            assert states is None
            continue
        assert states is not None
        text, mask = states  # and its own text's states, from the same pass
        assert [text[row, mask[row], 0].tolist() for row in range(len(token_ids))] == token_ids
