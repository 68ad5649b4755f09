"""Patch features on disk, keyed by image content: each image goes through the CNN once per extractor.

Layout: `<root>/<extractor fingerprint[:16]>/<key[:2]>/<key>.npy`, key = sha256 of the image file's
bytes, stored float16 (N, D); an augmented view's features (`model.views`) in `<fingerprint[:16]>-<view>/`.
A changed extractor config or weight file changes the fingerprint, so old entries are simply never looked
at again; byte-identical images share one entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from model.patch_features import PatchFeatureExtractor
from model.views import VIEWS, view_image

if TYPE_CHECKING:
    from model.catalogue import Catalogue, Item

logger = logging.getLogger(__name__)

# What a missing or broken image raises on the way to pixels: the catalogue's ImageError (a
# ValueError), a missing file (OSError), Pillow's UnidentifiedImageError (OSError), truncated or
# malformed data (OSError, SyntaxError, EOFError) and decompression bombs.
UNREADABLE_IMAGE_ERRORS = (ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)


def image_key(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


class FeatureCache:
    """Content-addressed store of one extractor's patch features, filled by `features_for`; with a `view`,
    those of that view of each photo (`model.views`), for the image tower's fit."""

    def __init__(self, root: str | Path, extractor: PatchFeatureExtractor, view: str | None = None) -> None:
        if view is not None and view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
        self.root = Path(root)
        self.extractor = extractor
        self.view = view
        fingerprint = extractor.fingerprint()
        self.folder = self.root / (fingerprint[:16] if view is None else f"{fingerprint[:16]}-{view}")
        self.shape = (extractor.num_patches, extractor.feature_dim)
        self._describe(fingerprint)

    def _describe(self, fingerprint: str) -> None:
        # A human-readable note of which extractor a folder of opaque hashes belongs to.
        note = self.folder / "extractor.json"
        if not note.exists():
            described = {"fingerprint": fingerprint, "config": self.extractor.config.to_dict()}
            if self.view is not None:
                described["view"] = self.view
            text = json.dumps(described, indent=2)
            self._write_atomic(note, lambda f: f.write(text.encode() + b"\n"))

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    # -- one entry ----------------------------------------------------------------------------

    def get(self, image_bytes: bytes) -> np.ndarray | None:
        """Cached float16 (N, D) features of this image file, or None (miss, or a corrupt entry, now removed)."""
        return self._load(image_key(image_bytes))

    def put(self, image_bytes: bytes, features: np.ndarray) -> None:
        """Store (N, D) features; readers see the old entry or the whole new one, never a partial file."""
        self._store(image_key(image_bytes), features)

    def _load(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        try:
            features = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError) as error:
            self._discard(path, f"unreadable ({error})")
            return None
        if features.shape != self.shape or features.dtype != np.float16:
            self._discard(path, f"{features.dtype} {features.shape}, expected float16 {self.shape}")
            return None
        return features

    def _discard(self, path: Path, reason: str) -> None:
        logger.warning("patch feature cache: removing corrupt entry %s: %s", path, reason)
        path.unlink(missing_ok=True)

    def _store(self, key: str, features: np.ndarray) -> None:
        if features.shape != self.shape:
            raise ValueError(f"patch features must be {self.shape}, got {features.shape}")
        array = np.ascontiguousarray(features, dtype=np.float16)
        self._write_atomic(self.path(key), lambda f: np.save(f, array, allow_pickle=False))

    @staticmethod
    def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
        # A temp file in the same folder (same file system) then os.replace: atomic on POSIX and Windows.
        # Without an fsync a power cut can still leave an empty entry; `_load` treats that as corrupt.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- a whole catalogue --------------------------------------------------------------------

    def features_for(
        self, catalogue: Catalogue, batch_size: int = 32, progress: bool = True
    ) -> tuple[Catalogue, np.ndarray]:
        """(catalogue of the items with a readable image, their float16 (n, N, D) features), in catalogue order.

        Hits only read and hash the file. Misses are decoded in a thread pool while the extractor runs
        the previous batch. Unreadable images are skipped with one warning.
        """
        items = list(catalogue.items)
        features = np.empty((len(items), *self.shape), dtype=np.float16)
        have = np.zeros(len(items), dtype=bool)
        waiting: dict[str, list[int]] = {}  # key -> rows that need it (byte-identical images share one pass)
        skipped: list[int] = []
        batch: list[tuple[str, Item, bytes]] = []
        decoding: list[tuple[str, Future[np.ndarray | None]]] = []
        computed = hits = 0

        def run(decoded: list[tuple[str, Future[np.ndarray | None]]]) -> None:
            nonlocal computed
            ready = [(key, future.result()) for key, future in decoded]
            for key, pixels in ready:
                if pixels is None:
                    rows = waiting.pop(key)
                    skipped.extend(rows)
                    bar.update(len(rows))
            ready = [(key, pixels) for key, pixels in ready if pixels is not None]
            if not ready:
                return
            pixels = np.stack([pixels for _, pixels in ready])  # (b, S, S, 3)
            batch_features = self.extractor.extract_pixels(pixels)  # (b, N, D)
            for (key, _), item_features in zip(ready, batch_features, strict=True):
                self._store(key, item_features)
                rows = waiting.pop(key)
                features[rows] = item_features
                have[rows] = True
                bar.update(len(rows))
            computed += len(ready)

        workers = min(4, os.cpu_count() or 1)
        with (
            tqdm(total=len(items), unit="img", desc="patch features", disable=not progress) as bar,
            ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool,
        ):
            for row, item in enumerate(items):
                try:
                    data = catalogue.image_bytes(item)
                except UNREADABLE_IMAGE_ERRORS:
                    skipped.append(row)
                    bar.update()
                    continue
                key = image_key(data)
                if key in waiting:
                    waiting[key].append(row)
                    continue
                cached = self._load(key)
                if cached is not None:
                    features[row] = cached
                    have[row] = True
                    hits += 1
                    bar.update()
                    continue
                waiting[key] = [row]
                batch.append((key, item, data))
                if len(batch) == batch_size:
                    # Decode this batch in the pool while the extractor runs the previous one.
                    submitted = [
                        (key, pool.submit(self._decode, catalogue, item, data, key))
                        for key, item, data in batch
                    ]
                    batch = []
                    run(decoding)
                    decoding = submitted
            run(decoding)
            run([(key, pool.submit(self._decode, catalogue, item, data, key)) for key, item, data in batch])

        if skipped:
            ids = [str(items[row].id) for row in sorted(skipped)[:5]]
            logger.warning(
                "patch features: skipped %d of %d items whose image is missing or unreadable (e.g. %s)",
                len(skipped),
                len(items),
                ", ".join(ids),
            )
        logger.info(
            "patch features: %d items: %d images computed, %d from cache, %d skipped",
            len(items),
            computed,
            hits,
            len(skipped),
        )
        if have.all():
            return catalogue, features
        keep = np.flatnonzero(have)
        return catalogue.subset([items[row] for row in keep]), features[keep]

    def _decode(self, catalogue: Catalogue, item: Item, data: bytes, key: str) -> np.ndarray | None:
        """An item's image (through the cache's view) -> letterboxed pixels, or None when it is not readable."""
        try:
            # Decoding the bytes already read and hashed saves a second read of the file.
            with Image.open(io.BytesIO(data)) as image:
                return self._preprocess(image, key)
        except UNREADABLE_IMAGE_ERRORS:
            pass
        try:
            # Not an encoded image file (HDF5 catalogues hand out raw arrays), or a broken one:
            # the catalogue knows how to open its own images, or raises ImageError.
            return self._preprocess(catalogue.open_image(item), key)
        except UNREADABLE_IMAGE_ERRORS:
            return None

    def _preprocess(self, image: Image.Image, key: str) -> np.ndarray:
        return self.extractor.preprocess(image if self.view is None else view_image(image, self.view, key))
