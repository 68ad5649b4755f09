"""Product catalogues (H&M, Myntra, Fashion-Gen, JSON lines) read into one shape: items with text and an image."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


class CatalogueError(ValueError):
    """The catalogue as a whole cannot be read; the message names the file and the problem."""


class ImageError(ValueError):
    """One item's image is missing or cannot be decoded; callers skip that item, not the catalogue."""


@dataclass(frozen=True)
class Item:
    id: str
    text: str  # what the model reads
    title: str  # short display title
    image: str  # an absolute file path, or "<abs h5 path>#<row>" for HDF5 catalogues
    category: str
    subcategory: str
    group: str  # product group: the train/validation split never separates one group
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


# Kinds whose image refs point into an HDF5 array rather than at an encoded file.
_HDF5_KINDS = frozenset({"fashiongen"})


@dataclass
class Catalogue:
    name: str
    source: str
    items: list[Item]
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    # Open HDF5 files by path, with the pid that opened them: h5py handles survive neither a fork nor pickling.
    _hdf5_files: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _hdf5_pid: int = field(default=0, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_hdf5_files": {}, "_hdf5_pid": 0}

    def image_bytes(self, item: Item) -> bytes:
        """The encoded image file, or for HDF5 the raw uint8 (H, W, 3) array bytes."""
        if self.name in _HDF5_KINDS:
            return self._hdf5_array(item).tobytes()
        try:
            return Path(item.image).read_bytes()
        except OSError as e:
            raise ImageError(f"item {item.id}: cannot read image {item.image}: {e}") from e

    def open_image(self, item: Item) -> Image.Image:
        """The decoded image in RGB; corrupt or missing images raise ImageError so callers can skip them."""
        if self.name in _HDF5_KINDS:
            return Image.fromarray(self._hdf5_array(item)).convert("RGB")
        data = self.image_bytes(item)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"item {item.id}: cannot decode image {item.image}: {e}") from e

    def _hdf5_array(self, item: Item) -> np.ndarray:
        path, _, row = item.image.rpartition("#")
        if not path or not row.isdigit():
            raise ImageError(f"item {item.id}: image ref {item.image!r} is not '<h5 path>#<row>'")
        if self._hdf5_pid != os.getpid():
            self._hdf5_files, self._hdf5_pid = {}, os.getpid()
        h5 = self._hdf5_files.get(path)
        if h5 is None:
            h5py = _import_h5py()
            try:
                h5 = h5py.File(path, "r")
            except OSError as e:
                raise ImageError(f"item {item.id}: cannot open {path}: {e}") from e
            self._hdf5_files[path] = h5
        try:
            array = np.asarray(h5["input_image"][int(row)], dtype=np.uint8)
        except (KeyError, IndexError, ValueError, OSError) as e:
            raise ImageError(f"item {item.id}: cannot read {item.image}: {e}") from e
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ImageError(
                f"item {item.id}: image {item.image} has shape {array.shape}, expected (H, W, 3)"
            )
        return np.ascontiguousarray(array)

    def fingerprint(self) -> str:
        """sha256 over ids, texts and image refs: names the exact item list a bundle or checkpoint was built from."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.id}\x1f{item.text}\x1f{item.image}\x1e".encode())
        return digest.hexdigest()

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[Catalogue, Catalogue]:
        """(train, validation), disjoint by group so colour variants and repeated titles never leak across."""
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        in_validation = {
            group: _unit_hash(seed, group) < val_fraction for group in {i.group for i in self.items}
        }
        train = [item for item in self.items if not in_validation[item.group]]
        validation = [item for item in self.items if in_validation[item.group]]
        return self.subset(train), self.subset(validation)

    def subset(self, items: Sequence[Item]) -> Catalogue:
        """These items under the same name and source, so images still open the same way."""
        return Catalogue(self.name, self.source, list(items), collections.Counter(self.skipped))

    def summary(self) -> str:
        """Counts, categories and skipped rows, for logs and the CLI."""
        groups = len({item.group for item in self.items})
        categories = collections.Counter(item.category or "(none)" for item in self.items).most_common()
        shown = ", ".join(f"{name} {count}" for name, count in categories[:10])
        if len(categories) > 10:
            shown += f", {len(categories) - 10} more"
        lines = [
            f"{self.name} catalogue from {self.source}: {len(self.items)} items in {groups} groups",
            f"  categories: {shown or '(none)'}",
        ]
        if self.skipped:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.skipped.most_common())
            lines.append(f"  skipped {sum(self.skipped.values())} rows: {reasons}")
        return "\n".join(lines)


def _unit_hash(seed: int, group: str) -> float:
    # sha256 rather than hash(): Python salts str hashes per process, and the split must not move between runs.
    digest = hashlib.sha256(f"{seed}\x1f{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class _Skips:
    """Rows skipped while reading: a count per reason and the first example, for one warning per reason."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, example)

    def warn(self, source: str) -> None:
        for reason, count in self.counts.most_common():
            logger.warning(
                "%s: skipped %d rows: %s (first: %s)", source, count, reason, self.examples[reason]
            )


# --- shared reading pieces ---------------------------------------------------------------------------------


def _sentences(parts: Sequence[str]) -> str:
    """Join non-empty parts as sentences: a full stop after each part but the last, unless it has one."""
    parts = [p.strip() for p in parts if p and p.strip()]
    return " ".join(p if i == len(parts) - 1 or p[-1] in ".!?" else p + "." for i, p in enumerate(parts))


def _metadata(row: Mapping[str, str], used: set[str]) -> dict[str, str]:
    return {key: value.strip() for key, value in row.items() if key not in used and value and value.strip()}


def _csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; surplus fields join the last column, where Myntra's titles carry stray commas."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise CatalogueError(f"{path}: empty file, expected a CSV header")
            missing = [name for name in required if name not in header]
            if missing:
                raise CatalogueError(f"{path}: missing columns {missing}")
            width = len(header)
            for fields in reader:
                if not fields:
                    continue
                if len(fields) > width:
                    fields = [*fields[: width - 1], ",".join(fields[width - 1 :])]
                elif len(fields) < width:
                    fields = [*fields, *[""] * (width - len(fields))]
                yield reader.line_num, dict(zip(header, fields, strict=True))
    except FileNotFoundError as e:
        raise CatalogueError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise CatalogueError(f"{path}: not a UTF-8 text file ({e})") from e
    except csv.Error as e:
        raise CatalogueError(f"{path}: not a readable CSV file ({e})") from e
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read ({e})") from e


def _images_dir(root: Path) -> Path:
    images = root / "images"
    if not images.is_dir():
        raise CatalogueError(f"{images}: images folder not found")
    return images


# --- readers, one per kind ---------------------------------------------------------------------------------

_HM_COLUMNS = (
    "article_id",
    "product_code",
    "prod_name",
    "product_type_name",
    "product_group_name",
    "colour_group_name",
    "detail_desc",
)
_HM_FIELDS = {"article_id", "product_code", "prod_name", "product_type_name", "product_group_name"}


def _read_hm(root: Path, skip: _Skips) -> Iterator[Item]:
    """H&M Kaggle layout: articles.csv and images/<first 3 digits>/<10-digit article_id>.jpg."""
    if root.is_file():  # pointed at articles.csv itself
        root = root.parent
    images = _images_dir(root)
    for line, row in _csv_rows(root / "articles.csv", _HM_COLUMNS):
        article_id, name = row["article_id"].strip(), row["prod_name"].strip()
        if article_id.isdigit():
            article_id = article_id.zfill(10)  # a CSV saved through a numeric column loses the leading zero
        if not article_id or not name or not row["product_code"].strip():
            skip("missing article_id, product_code or prod_name", f"articles.csv line {line}")
            continue
        image = images / article_id[:3] / f"{article_id}.jpg"
        if not image.is_file():
            skip("image not found", str(image))
            continue
        product_type = row["product_type_name"].strip()
        colour_and_type = " ".join(p for p in (row["colour_group_name"].strip(), product_type) if p)
        yield Item(
            id=article_id,
            text=_sentences([name, colour_and_type, row["detail_desc"]]),
            title=name,
            image=str(image),
            category=row["product_group_name"].strip(),
            subcategory=product_type,
            group=row["product_code"].strip(),
            metadata=_metadata(row, _HM_FIELDS),
        )


_MYNTRA_COLUMNS = ("id", "productDisplayName", "masterCategory", "articleType")
_MYNTRA_FIELDS = set(_MYNTRA_COLUMNS)


def _normalised_title(title: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed: Myntra repeats titles with small variations."""
    return " ".join(re.sub(r"[^\w\s]", "", title.lower()).split())


def _read_myntra(root: Path, skip: _Skips) -> Iterator[Item]:
    """Myntra "Fashion Product Images" layout: styles.csv and images/<id>.jpg."""
    if root.is_file():  # pointed at styles.csv itself
        root = root.parent
    images = _images_dir(root)
    for line, row in _csv_rows(root / "styles.csv", _MYNTRA_COLUMNS):
        style_id, title = row["id"].strip(), row["productDisplayName"].strip()
        if not style_id or not title:
            skip("missing id or productDisplayName", f"styles.csv line {line}")
            continue
        image = images / f"{style_id}.jpg"
        if not image.is_file():
            skip("image not found", str(image))
            continue
        article_type = row["articleType"].strip()
        who_what = " ".join(p for p in (row.get("gender", "").strip(), article_type) if p)
        attributes = [who_what, *(row.get(k, "").strip() for k in ("baseColour", "season", "usage"))]
        yield Item(
            id=style_id,
            text=_sentences([title, ", ".join(a for a in attributes if a)]),
            title=title,
            image=str(image),
            category=row["masterCategory"].strip(),
            subcategory=article_type,
            group=_normalised_title(title),
            metadata=_metadata(row, _MYNTRA_FIELDS),
        )


_FASHIONGEN_REQUIRED = ("input_image", "input_name", "input_description", "input_productID")
_FASHIONGEN_FIELDS = {*_FASHIONGEN_REQUIRED, "input_category", "input_subcategory"}
_HDF5_CHUNK = (
    4096  # rows of text read at once: whole columns of the 260k-row train file would be slow to start
)


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise CatalogueError(
            "reading Fashion-Gen HDF5 needs h5py: pip install h5py (or the 'fashiongen' extra)"
        ) from e
    return h5py


def _h5_text(value: Any) -> str:
    """One cell of a (N, 1) or (N,) column as text; Fashion-Gen mixes UTF-8 and latin-1 bytes."""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    return str(value).strip()


def _read_fashiongen(path: Path, skip: _Skips) -> Iterator[Item]:
    """Fashion-Gen HDF5: one row per image, several images per product, text in (N, 1) byte-string columns."""
    h5py = _import_h5py()
    if not path.is_file():
        raise CatalogueError(f"{path}: file not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise CatalogueError(f"{path}: not a readable HDF5 file ({e})") from e
    with h5:
        missing = [name for name in _FASHIONGEN_REQUIRED if name not in h5]
        if missing:
            raise CatalogueError(f"{path}: missing datasets {missing}")
        images = h5["input_image"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise CatalogueError(f"{path}: input_image has shape {images.shape}, expected (N, H, W, 3)")
        rows = images.shape[0]
        columns = {
            name: ds
            for name, ds in h5.items()
            if name != "input_image"
            and isinstance(ds, h5py.Dataset)
            and ds.shape[:1] == (rows,)
            and (ds.ndim == 1 or ds.shape[1:] == (1,))
        }
        bad = [name for name in _FASHIONGEN_REQUIRED[1:] if name not in columns]
        if bad:
            raise CatalogueError(f"{path}: datasets {bad} are not one text value per image row ({rows} rows)")
        for start in range(0, rows, _HDF5_CHUNK):
            chunk = {name: ds[start : start + _HDF5_CHUNK] for name, ds in columns.items()}
            for offset in range(len(chunk["input_name"])):
                row = start + offset
                values = {name: _h5_text(column[offset]) for name, column in chunk.items()}
                product_id, name = values["input_productID"], values["input_name"]
                if not product_id or not name:
                    skip("missing input_productID or input_name", f"row {row}")
                    continue
                yield Item(
                    id=f"{product_id}_{row}",
                    text=_sentences([name, values["input_description"]]),
                    title=name,
                    image=f"{path}#{row}",
                    category=values.get("input_category", ""),
                    subcategory=values.get("input_subcategory", ""),
                    group=product_id,
                    metadata={
                        key.removeprefix("input_"): value
                        for key, value in values.items()
                        if key not in _FASHIONGEN_FIELDS and value
                    },
                )


_JSONL_FIELDS = {"id", "text", "image", "title", "category", "subcategory", "group"}


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else json.dumps(value)


def _read_jsonl(path: Path, skip: _Skips) -> Iterator[Item]:
    """One JSON object per line with id, text and image (relative to the file's folder); extras become metadata."""
    folder = path.parent
    seen_object = False
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if not seen_object:  # the first line decides whether this is JSON lines at all
                        raise CatalogueError(f"{path}: line {line_no} is not JSON ({e})") from e
                    skip("invalid JSON", f"line {line_no}")
                    continue
                if not isinstance(record, dict):
                    if not seen_object:
                        raise CatalogueError(f"{path}: line {line_no} is not a JSON object")
                    skip("not a JSON object", f"line {line_no}")
                    continue
                seen_object = True
                item_id, text, image = (_json_text(record.get(key)) for key in ("id", "text", "image"))
                missing = [
                    key for key, value in (("id", item_id), ("text", text), ("image", image)) if not value
                ]
                if missing:
                    skip(f"missing {', '.join(missing)}", f"line {line_no}")
                    continue
                image_path = folder / image
                if not image_path.is_file():
                    skip("image not found", str(image_path))
                    continue
                yield Item(
                    id=item_id,
                    text=text,
                    title=_json_text(record.get("title")) or " ".join(text.split()[:8]),
                    image=os.path.normpath(image_path),
                    category=_json_text(record.get("category")),
                    subcategory=_json_text(record.get("subcategory")),
                    group=_json_text(record.get("group")) or item_id,
                    metadata={k: _json_text(v) for k, v in record.items() if k not in _JSONL_FIELDS},
                )
    except FileNotFoundError as e:
        raise CatalogueError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise CatalogueError(f"{path}: not a UTF-8 text file ({e})") from e
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read ({e})") from e


_READERS: dict[str, Callable[[Path, _Skips], Iterator[Item]]] = {
    "hm": _read_hm,
    "myntra": _read_myntra,
    "fashiongen": _read_fashiongen,
    "jsonl": _read_jsonl,
}


def parse_spec(spec: str) -> tuple[str, Path]:
    """Split "kind:path" ("hm:../shared/data/hm"), checking the kind is one we can read."""
    kind, colon, path = spec.partition(":")
    kind = kind.strip()
    if not colon or not path.strip():
        raise CatalogueError(f"{spec!r}: expected KIND:PATH with KIND one of {sorted(_READERS)}")
    if kind not in _READERS:
        raise CatalogueError(f"{spec!r}: unknown catalogue kind {kind!r}, expected one of {sorted(_READERS)}")
    return kind, Path(path.strip()).expanduser()


def load_catalogue(spec: str, limit: int | None = None) -> Catalogue:
    """Read a catalogue, skipping (and counting) bad rows; `limit` stops after that many good items."""
    kind, path = parse_spec(spec)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    skip = _Skips()
    items: list[Item] = []
    seen: set[str] = set()
    reader = _READERS[kind](path.resolve(), skip)
    try:
        # The check comes after the next item is pulled, so the file is opened and checked even for limit=0.
        for item in reader:
            if limit is not None and len(items) >= limit:
                break
            if item.id in seen:
                skip("duplicate id", item.id)
                continue
            seen.add(item.id)
            items.append(item)
    finally:
        reader.close()
    skip.warn(spec)
    if not items and limit != 0:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skip.counts.most_common()) or "no rows"
        raise CatalogueError(f"{path}: no usable items ({reasons})")
    catalogue = Catalogue(kind, spec, items, skip.counts)
    logger.info("read %s", catalogue.summary())
    return catalogue
