"""A bundle is a folder the service loads once: two recall indexes, re-rank features, metadata, a manifest.

    manifest.json        format version, model fingerprint, factory strings, counts, dims, sha256 of every file
    image.faiss          image embeddings, searched by text queries
    text.faiss           text embeddings, searched by image queries
    patch_codec.faiss    the trained patch-feature codec (faiss sa_encode / sa_decode)
    patch_codes.npy      (rows, N, code_size) uint8: every item's patch grid as the encoder reads it
                         (pooled, `patches_per_item` in the manifest), memory-mapped; models without a
                         fusion layer only (a fused model's re-ranking reads the states below)
    token_ids.npy        (rows, T) uint16/int32 word-piece ids, right-padded; token_lengths.npy (rows,)
    items.sqlite         metadata, row = faiss id, with the `removed` flag
    text_states.npy      models with a fusion layer only (`FashionBertConfig.fusion_layer`): (word pieces,
                         code) uint8 codes of each item's text states below the fusion layer, item after
                         item (`text_layout` "ragged"; "padded" bundles hold (rows, T, code)), and
    image_states.npy     (rows, N, code) of its patch states: re-ranking starts from them, memory-mapped;
                         bundles built with `states_codec` "" hold float16 states (width H) instead
    text_states_codec.faiss, image_states_codec.faiss   the two files' codecs (faiss sa_decode)
    image_offsets.npy    (rows,) float32 querybank offsets of the image index's rows, text_offsets.npy the
                         same for the text index: recall ranks by inner product minus the offset
                         (`model.querybank`; bundles without a `querybank` manifest section have none)
    querybank_texts.npy, querybank_images.npy, querybank_groups.npy   the bank (float16 (B, E) embeddings
                         and group hashes), so items added later get offsets from the same bank

The manifest is written last and the folder renamed into place only when complete, so a folder with a
manifest is a whole bundle; `Bundle.open` still checks sizes and checksums before it trusts a byte. Only
faiss indexes and pickle-free .npy files are read, and only from inside the bundle folder.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import metadata
from index.codec import decode
from index.search import RowFilter, filtered_search, normalised_search, row_filter
from model.files import sha256_file as file_sha256
from model.pair_states import STATES_DTYPE

FORMAT = "fashionbert-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_INDEX, TEXT_INDEX = "image.faiss", "text.faiss"
PATCH_CODEC, PATCH_CODES = "patch_codec.faiss", "patch_codes.npy"
TOKEN_IDS, TOKEN_LENGTHS = "token_ids.npy", "token_lengths.npy"
ITEMS_DB = "items.sqlite"
FILES = (IMAGE_INDEX, TEXT_INDEX, TOKEN_IDS, TOKEN_LENGTHS, ITEMS_DB)
PATCH_FILES = (PATCH_CODEC, PATCH_CODES)
IMAGE_OFFSETS, TEXT_OFFSETS = "image_offsets.npy", "text_offsets.npy"
BANK_TEXTS, BANK_IMAGES, BANK_GROUPS = "querybank_texts.npy", "querybank_images.npy", "querybank_groups.npy"
QUERYBANK_FILES = (IMAGE_OFFSETS, TEXT_OFFSETS, BANK_TEXTS, BANK_IMAGES, BANK_GROUPS)
TEXT_STATES, IMAGE_STATES = "text_states.npy", "image_states.npy"
STATE_FILES = (TEXT_STATES, IMAGE_STATES)
STATE_CODEC_FILES = ("text_states_codec.faiss", "image_states_codec.faiss")  # in STATE_FILES' order


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with, of another format version or another model."""


def bundle_files(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The files a bundle with this manifest must hold."""
    return (
        FILES
        + (PATCH_FILES if "patch_codec" in manifest else ())
        + (QUERYBANK_FILES if "querybank" in manifest else ())
        + (STATE_FILES if "states" in manifest else ())
        + (STATE_CODEC_FILES if manifest.get("states", {}).get("codecs") else ())
    )


def file_entries(folder: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section: size and sha256 of each bundle file."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in names
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle folder, its format and version checked; raises BundleError."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    file = folder / MANIFEST
    if not file.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}: not a bundle, or a build that did not finish")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{file}: unreadable manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format version {manifest.get('format_version')!r}, this code reads version "
            f"{FORMAT_VERSION}; rebuild the bundle with `fashionbert index build`"
        )
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any], checksums: bool = True) -> None:
    """Every file the manifest lists is there with its size (and sha256); raises BundleError naming the file."""
    files = manifest.get("files", {})
    missing = [name for name in bundle_files(manifest) if name not in files]
    if missing:
        raise BundleError(f"{folder}: manifest lists no {missing}")
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise BundleError(f"{folder}: bundle file {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']}: truncated or replaced"
            )
        if checksums and file_sha256(path) != entry["sha256"]:
            raise BundleError(
                f"{path}: sha256 does not match the manifest: the file is corrupt or was modified"
            )


def check_model(manifest: Mapping[str, Any], fingerprint: str | None, where: Path) -> None:
    built_with = manifest["model"]["fingerprint"]
    if fingerprint is not None and fingerprint != built_with:
        raise BundleError(
            f"{where}: built with model {built_with[:12]}, not the given model {fingerprint[:12]}: "
            "its embeddings live in another space; rebuild the bundle for this model"
        )


def stored_patches(manifest: Mapping[str, Any]) -> int:
    """Patches stored per item: the encoder's pooled grid, or every patch in bundles older than pooling."""
    section = manifest["patch_codec"] if "patch_codec" in manifest else manifest["states"]
    return int(section.get("patches_per_item", manifest["model"]["num_patches"]))


def _read_index(path: Path, dim: int, rows: int) -> faiss.Index:
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise BundleError(f"{path}: not a readable faiss index ({str(error).splitlines()[0]})") from error
    if index.d != dim or index.ntotal != rows:
        raise BundleError(f"{path}: {index.ntotal} x {index.d}-d, the manifest says {rows} x {dim}-d")
    return index


def _load_array(path: Path, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as error:
        raise BundleError(f"{path}: not a readable .npy array ({error})") from error
    if array.shape != shape:
        raise BundleError(f"{path}: shape {array.shape}, the manifest says {shape}")
    return array


class Bundle:
    """A read-only bundle, loaded once and shared by the service's threads."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        counts, model = manifest["counts"], manifest["model"]
        self.rows = int(counts["rows"])
        self.embed_dim = int(model["embed_dim"])
        # The grid the encoder reads (pooled at build time); bundles before pooling stored every patch.
        self.patches_per_item = stored_patches(manifest)
        self.patch_feature_dim = int(model["patch_feature_dim"])
        self.nprobe = int(manifest["indexes"]["nprobe"])
        self.image_index = _read_index(path / IMAGE_INDEX, self.embed_dim, self.rows)
        self.text_index = _read_index(path / TEXT_INDEX, self.embed_dim, self.rows)
        # Patch codes: only in bundles of models without a fusion layer (older fused bundles have them too).
        self.codec: faiss.Index | None = None
        self._codes: np.ndarray | None = None
        if "patch_codec" in manifest:
            self.codec = _read_index(path / PATCH_CODEC, self.patch_feature_dim, 0)
            # Memory-mapped: only the shortlisted items' codes are ever paged in.
            self._codes = _load_array(
                path / PATCH_CODES, (self.rows, self.patches_per_item, self.codec.sa_code_size()), mmap=True
            )
        max_len = int(manifest["tokens"]["max_len"])
        self._token_ids = _load_array(path / TOKEN_IDS, (self.rows, max_len))
        self._token_lengths = _load_array(path / TOKEN_LENGTHS, (self.rows,))
        try:
            self._db = metadata.open_items_db(path / ITEMS_DB)
            stored = metadata.count_rows(self._db)
            removed = metadata.removed_rows(self._db)
        except sqlite3.DatabaseError as error:
            raise BundleError(f"{path / ITEMS_DB}: not a readable items database ({error})") from error
        if stored != self.rows:
            raise BundleError(f"{path / ITEMS_DB}: {stored} rows, the manifest says {self.rows}")
        self._lock = threading.Lock()  # one SQLite connection, one statement at a time
        self.live = np.ones(self.rows, dtype=bool)
        self.live[removed] = False
        self.size = int(self.live.sum())
        self._live_filter = row_filter(self.live) if self.size < self.rows else None
        self._matching = functools.lru_cache(maxsize=256)(self._rows_matching)
        # Querybank offsets per index (None in bundles built without): recall subtracts them.
        self.image_offsets = self.text_offsets = None
        if "querybank" in manifest:
            self.image_offsets = _load_array(path / IMAGE_OFFSETS, (self.rows,))
            self.text_offsets = _load_array(path / TEXT_OFFSETS, (self.rows,))
        # Side states below the model's fusion layer (None in bundles of models without one).
        self.stores_states = "states" in manifest
        self._states: dict[str, np.ndarray] = {}
        self._state_codecs: dict[str, faiss.Index] = {}
        self._text_starts: np.ndarray | None = None  # ragged text states: where each row's word pieces start
        if self.stores_states:
            hidden = int(manifest["states"]["hidden"])
            codecs = manifest["states"].get("codecs", {})
            ragged = manifest["states"].get("text_layout", "padded") == "ragged"  # padded before stop 34
            lengths = self._token_lengths.astype(np.int64)
            if ragged:
                self._text_starts = np.cumsum(lengths) - lengths
            for name, length in ((TEXT_STATES, max_len), (IMAGE_STATES, self.patches_per_item)):
                width = hidden
                if codecs:  # uint8 codes, decoded for the rows asked for
                    entry = codecs[name]
                    codec = _read_index(path / entry["file"], hidden, 0)
                    if codec.sa_code_size() != int(entry["code_size"]):
                        raise BundleError(f"{path / entry['file']}: not the codec the manifest describes")
                    self._state_codecs[name], width = codec, codec.sa_code_size()
                shape = (self.rows, length, width)
                if name == TEXT_STATES and ragged:
                    shape = (int(lengths.sum()), width)
                self._states[name] = _load_array(path / name, shape, mmap=True)

    @classmethod
    def open(
        cls, path: str | Path, expected_model_fingerprint: str | None = None, verify_checksums: bool = True
    ) -> Bundle:
        """Load a bundle, refusing (BundleError) a missing, partial, tampered or other-model one."""
        folder = Path(path)
        manifest = read_manifest(folder)
        check_model(manifest, expected_model_fingerprint, folder)
        verify_files(folder, manifest, checksums=verify_checksums)
        try:
            return cls(folder, manifest)
        except KeyError as error:
            raise BundleError(f"{folder / MANIFEST}: missing field {error}") from error

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recall --------------------------------------------------------------------------------------

    def search_images(
        self, query_embeddings: np.ndarray, k: int, nprobe: int | None = None, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Text query embeddings (q, E) -> (scores (q, k), item rows (q, k)); removed excluded, -1 padding.

        `rows` limits results to those rows (from `rows_matching`), e.g. one category. Scores are
        querybank-normalised where the bundle has offsets.
        """
        return self._search(self.image_index, self.image_offsets, query_embeddings, k, nprobe, rows)

    def search_texts(
        self, query_embeddings: np.ndarray, k: int, nprobe: int | None = None, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image query embeddings (q, E) -> (scores, rows) over the items' text embeddings."""
        return self._search(self.text_index, self.text_offsets, query_embeddings, k, nprobe, rows)

    def _search(
        self,
        index: faiss.Index,
        offsets: np.ndarray | None,
        query_embeddings: np.ndarray,
        k: int,
        nprobe: int | None,
        rows: np.ndarray | Sequence[int] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        allowed, nprobe = self._allowed(rows), nprobe or self.nprobe
        if offsets is None:
            return filtered_search(index, query_embeddings, k, allowed, nprobe)
        return normalised_search(index, query_embeddings, k, offsets, allowed, nprobe)

    def _allowed(self, rows: np.ndarray | Sequence[int] | None) -> RowFilter | None:
        if rows is None:
            return self._live_filter
        allowed = np.zeros(self.rows, dtype=bool)
        allowed[np.asarray(list(rows) if isinstance(rows, set) else rows, dtype=np.int64)] = True
        return row_filter(allowed & self.live)

    # -- re-rank inputs ------------------------------------------------------------------------------

    def _check_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows must be in [0, {self.rows}); drop the -1 padding of search results first")
        return rows

    def patch_features(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """(len(rows), N, D) float32 patch features decoded for the cross-encoder."""
        assert self.codec is not None and self._codes is not None, (
            "this bundle stores states, not patch codes: its model has a fusion layer"
        )
        rows = self._check_rows(rows)
        return decode(self.codec, np.asarray(self._codes[rows]))

    def token_ids(self, rows: np.ndarray | Sequence[int]) -> list[list[int]]:
        """The items' word-piece ids ([CLS] ... [SEP]) as the model tokenized their text at build time."""
        rows = self._check_rows(rows)
        return [self._token_ids[r, : self._token_lengths[r]].tolist() for r in rows]

    def text_states(self, rows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The items' text states below the fusion layer, (n, T, H) float16 with T the longest of these
        texts, and the (n, T) bool mask of their word pieces; only in bundles that store states."""
        rows = self._check_rows(rows)
        lengths = self._token_lengths[rows].astype(np.int64)
        longest = int(lengths.max(initial=0))
        mask = np.arange(longest) < lengths[:, None]
        if self._text_starts is None:
            return self._read_states(TEXT_STATES, rows, longest), mask
        # Ragged: gather the rows' word pieces (row after row, as the mask orders them), then pad.
        before = np.cumsum(lengths) - lengths  # where each row's pieces start among those gathered
        pieces = np.arange(int(lengths.sum())) + np.repeat(self._text_starts[rows] - before, lengths)
        words = self._read_states(TEXT_STATES, pieces)
        text = np.zeros((len(rows), longest, words.shape[-1]), words.dtype)
        text[mask] = words
        return text, mask

    def image_states(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The items' patch states below the fusion layer: (n, N, H) float16."""
        return self._read_states(IMAGE_STATES, self._check_rows(rows))

    def _read_states(self, name: str, rows: np.ndarray, length: int | None = None) -> np.ndarray:
        assert self.stores_states, "this bundle stores no states: its model has no fusion layer"
        stored = np.asarray(self._states[name][rows, :length])
        codec = self._state_codecs.get(name)
        return stored if codec is None else decode(codec, stored).astype(STATES_DTYPE)

    # -- metadata ------------------------------------------------------------------------------------

    def items(self, rows: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """Metadata dicts (row, id, title, text, category, subcategory, image, group, metadata, ...) in order."""
        rows = self._check_rows(rows)
        with self._lock:
            found = metadata.fetch_rows(self._db, rows.tolist())
        return [found[int(r)] for r in rows]

    def row_of(self, item_id: str) -> int | None:
        """The live row of an item id; None when unknown or removed."""
        item = self.item(item_id)
        return None if item is None else item["row"]

    def item(self, item_id: str) -> dict[str, Any] | None:
        with self._lock:
            return metadata.fetch_live_by_id(self._db, str(item_id))

    def rows_matching(self, filters: Mapping[str, str | Sequence[str]]) -> np.ndarray:
        """Sorted live rows matching every filter: keys id, category, subcategory, group, metadata.<field>.

        A list value matches any of its entries. Cached: a bundle never changes, and the same category
        filters come back query after query. The array is read-only.
        """
        key = tuple(sorted((k, v if isinstance(v, str) else tuple(v)) for k, v in filters.items()))
        return self._matching(key)

    def _rows_matching(self, key: tuple[tuple[str, str | tuple[str, ...]], ...]) -> np.ndarray:
        with self._lock:
            rows = metadata.rows_matching(self._db, dict(key))
        rows.flags.writeable = False
        return rows

    def image_path(self, item_id: str) -> Path | None:
        """The item's image file when it is a file on this machine (HDF5 references are not)."""
        item = self.item(item_id)
        if item is None or "#" in item["image"]:
            return None
        path = Path(item["image"])
        return path if path.is_file() else None

    # -- description ---------------------------------------------------------------------------------

    def file_sizes(self) -> dict[str, int]:
        return {name: entry["bytes"] for name, entry in self.manifest["files"].items()}

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {self.size} live of {self.rows} rows)"
