"""The offline index jobs: build a bundle from catalogues, add items to one, mark items removed.

Every job writes a complete new bundle into a staging folder and publishes it in one step
(`index/staging.py`); unchanged files are hard-linked, so removing items copies only the metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import faiss
import numpy as np
from tqdm.auto import tqdm

from index import metadata
from index.bundle import (
    BANK_GROUPS,
    BANK_IMAGES,
    BANK_TEXTS,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_INDEX,
    IMAGE_OFFSETS,
    ITEMS_DB,
    MANIFEST,
    PATCH_CODEC,
    PATCH_CODES,
    STATE_CODEC_FILES,
    STATE_FILES,
    TEXT_INDEX,
    TEXT_OFFSETS,
    TOKEN_IDS,
    TOKEN_LENGTHS,
    BundleError,
    bundle_files,
    check_model,
    file_entries,
    read_manifest,
    stored_patches,
    verify_files,
)
from index.codec import encode, train_codec
from index.config import IndexConfig
from index.factory import add_vectors, build_index, choose_factory, gpu_available
from index.search import inverted_lists
from index.staging import link_or_copy, locked, publish, staging_folder
from model.catalogue import Catalogue
from model.patches import pool_grid
from model.querybank import QueryBank, draw_bank, group_hashes

logger = logging.getLogger(__name__)

# catalogue -> (the items whose image could be read, their float16 (n, N, D) patch features):
# `FeatureCache(root, extractor).features_for` with its progress bar off.
PatchFeatureSource = Callable[[Catalogue], tuple[Catalogue, np.ndarray]]


class Encoder(Protocol):
    """What the jobs need of `model.inference.FashionBertInference` (tests pass stand-ins)."""

    # FashionBertConfig: embed_dim, num_patches, patch_pool, encoder_patches, patch_feature_dim, max_text_len,
    # patch_features, bert
    config: Any
    fingerprint: str
    tower_logit_scale: float  # the towers' contrastive inverse temperature: querybank normalisation's beta

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, patch_features: np.ndarray, batch_size: int = ...) -> np.ndarray: ...

    # Models with a fusion layer (config.fusion_layer > 0) only: each side's states below it.
    def text_states(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]: ...

    def encode_token_ids_with_states(
        self, token_ids: Sequence[Sequence[int]], batch_size: int = ...
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def image_states(self, patch_features: np.ndarray) -> np.ndarray: ...


@dataclass
class JobReport:
    """What a job did: rows in the bundle now, items added, skipped and why, time per stage."""

    path: Path
    rows: int = 0
    added: int = 0
    skipped_unreadable: int = 0
    skipped_duplicate: int = 0
    removed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass
class _Encoded:
    """Everything the encode pass produced for the new rows, apart from the codes streamed to disk."""

    image_embeddings: list[np.ndarray] = field(default_factory=list)
    text_embeddings: list[np.ndarray] = field(default_factory=list)
    token_ids: list[np.ndarray] = field(default_factory=list)
    token_lengths: list[np.ndarray] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    catalogues: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0


class _StateStreams:
    """The new rows' side states below the model's fusion layer, streamed to raw files and wrapped as .npy
    at the end like the patch codes (a catalogue's states need not fit in memory). For models with a
    fusion layer only: without one, re-ranking reads token ids and patch codes alone. With `codecs` (one
    per states file) the files hold their uint8 codes, else float16 states. Text states are `ragged`
    (each item's word pieces only, one item after another) or padded to max_text_len positions."""

    def __init__(
        self, staging: Path, encoder: Encoder, codecs: Mapping[str, faiss.Index] | None, text_layout: str
    ) -> None:
        self.staging = staging
        self.text_layout = text_layout
        self.max_len = encoder.config.max_text_len
        self.patches = encoder.config.encoder_patches
        self.fusion_layer = encoder.config.fusion_layer
        self.codecs = codecs
        self.hidden = 0  # read off the first states written
        self._open = contextlib.ExitStack()
        self.files = {
            name: self._open.enter_context((staging / (name + ".part")).open("wb")) for name in STATE_FILES
        }

    @staticmethod
    def wanted(encoder: Encoder) -> bool:
        return getattr(encoder.config, "fusion_layer", 0) > 0

    def copy_rows(self, bundle: Path) -> None:
        """Start with an existing bundle's rows (adding items)."""
        for name, out in self.files.items():
            _copy_npy_rows(bundle / name, out)

    def write(self, encoder: Encoder, text: np.ndarray, mask: np.ndarray, pooled_patches: np.ndarray) -> None:
        """Append rows: (n, T, H) text states and their (n, T) mask (T the chunk's longest text), and the
        rows' pooled patches, whose states are computed here."""
        image = encoder.image_states(pooled_patches)  # (n, N, H)
        self.hidden = text.shape[-1]
        words = text[mask]  # (word pieces, H), item after item: only they are worth storing
        if self.codecs:
            words = encode(self.codecs[STATE_FILES[0]], words)
            image = encode(self.codecs[STATE_FILES[1]], image)
        else:
            words, image = words.astype(np.float16), image.astype(np.float16)
        if self.text_layout == "padded":  # max_len positions an item, zeros after its word pieces
            padded = np.zeros((len(mask), self.max_len, words.shape[-1]), words.dtype)
            padded[:, : mask.shape[1]][mask] = words
            words = padded
        for name, array in zip(STATE_FILES, (words, image), strict=True):
            self.files[name].write(np.ascontiguousarray(array).tobytes())

    def finish(self, rows: int) -> dict[str, Any]:
        """Wrap the raw files as .npy of `rows` rows (ragged text states: of all their word pieces); the
        manifest's `states` section (less `codecs`)."""
        self.close()
        for name, length in zip(STATE_FILES, (self.max_len, self.patches), strict=True):
            if self.codecs:
                dtype, width = np.dtype(np.uint8), self.codecs[name].sa_code_size()
            else:
                dtype, width = np.dtype(np.float16), self.hidden
            raw = self.staging / (name + ".part")
            shape: tuple[int, ...] = (rows, length, width)
            if name == STATE_FILES[0] and self.text_layout == "ragged":
                shape = (raw.stat().st_size // (width * dtype.itemsize), width)
            _write_npy_from_raw(raw, self.staging / name, dtype, shape)
        return {
            "text_layout": self.text_layout,
            "fusion_layer": self.fusion_layer,
            "hidden": self.hidden,
            "dtype": "uint8" if self.codecs else "float16",
            "patches_per_item": self.patches,
            "text": STATE_FILES[0],
            "image": STATE_FILES[1],
        }

    def close(self) -> None:
        self._open.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_list(catalogues: Catalogue | Iterable[Catalogue]) -> list[Catalogue]:
    return [catalogues] if isinstance(catalogues, Catalogue) else list(catalogues)


def _token_dtype(encoder: Encoder) -> np.dtype:
    vocab = int((getattr(encoder.config, "bert", None) or {}).get("vocab_size", 1 << 31))
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)


def _model_section(encoder: Encoder) -> dict[str, Any]:
    config = encoder.config
    return {
        "fingerprint": encoder.fingerprint,
        "embed_dim": config.embed_dim,
        "num_patches": config.num_patches,
        "patch_feature_dim": config.patch_feature_dim,
        "max_text_len": config.max_text_len,
        "patch_features": dict(config.patch_features),
    }


# -- encoding -------------------------------------------------------------------------------------------


@dataclass
class _CodecSample:
    """Items drawn at random from all catalogues to train the codecs: their word-piece ids and their
    pooled patch grids (n, N, D)."""

    token_ids: list[list[int]]
    pooled: np.ndarray


def _codec_sample(
    encoder: Encoder,
    catalogues: Sequence[Catalogue],
    patch_features: PatchFeatureSource,
    pool: int,
    config: IndexConfig,
) -> _CodecSample:
    sizes = [len(c) for c in catalogues]
    total = sum(sizes)
    rng = np.random.default_rng(config.seed)
    picks = np.sort(rng.choice(total, min(total, config.codec_train_items), replace=False))
    token_ids, grids, start = [], [], 0
    for catalogue, size in zip(catalogues, sizes, strict=True):
        chosen = picks[(picks >= start) & (picks < start + size)] - start
        start += size
        if len(chosen):
            kept, features = patch_features(catalogue.subset([catalogue.items[i] for i in chosen]))
            if len(kept):
                token_ids += encoder.tokenize([item.text for item in kept.items])
                grids.append(pool_grid(features, pool).astype(np.float32))
    if not grids:
        raise BundleError("none of the items sampled to train the patch codec has a readable image")
    return _CodecSample(token_ids, np.concatenate(grids))


def _train_state_codecs(
    encoder: Encoder, sample: _CodecSample, config: IndexConfig
) -> tuple[dict[str, faiss.Index], dict[str, Any]]:
    """One codec per states file, trained on the sample's states (text: its word pieces only); the
    codecs and the manifest's `states.codecs` section."""
    text, mask = encoder.text_states(sample.token_ids)
    image = encoder.image_states(sample.pooled)
    codecs, section = {}, {}
    for (name, codec_file), vectors in zip(
        zip(STATE_FILES, STATE_CODEC_FILES, strict=True),
        (text[mask], image.reshape(-1, image.shape[-1])),
        strict=True,
    ):
        codec, factory = train_codec(
            vectors.astype(np.float32), config.states_codec, config.pq_iterations, what="side state"
        )
        codecs[name] = codec
        section[name] = {
            "file": codec_file,
            "factory": factory,
            "code_size": codec.sa_code_size(),
            "trained_on": len(vectors),
        }
    return codecs, section


def _read_state_codecs(path: Path, manifest: Mapping[str, Any]) -> dict[str, faiss.Index] | None:
    """The codecs of a bundle's stored states; None where it stores float16 states."""
    section = manifest["states"].get("codecs")
    if not section:
        return None
    return {name: faiss.read_index(str(path / entry["file"])) for name, entry in section.items()}


@dataclass
class _EncodePass:
    """What every chunk of an encode pass uses: the model, where patch features come from, the patch
    codec (None for a fused model) and the grid it stores (patches pooled `pool` x `pool`)."""

    encoder: Encoder
    patch_features: PatchFeatureSource
    codec: faiss.Index | None
    pool: int
    config: IndexConfig
    report: JobReport
    progress: bool
    states: _StateStreams | None = None


def _encode_texts(
    encoder: Encoder, token_ids: Sequence[Sequence[int]], batch_size: int, with_states: bool = False
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(n, E) text embeddings, each distinct text through the tower once (colour variants often share one
    description), shortest first so each model batch pads only to its own longest text; `with_states`
    (a fused model) also gives the texts' (n, T, H) states below the fusion layer and their (n, T) mask,
    from the same pass."""
    distinct = list(dict.fromkeys(tuple(ids) for ids in token_ids))
    order = np.argsort([len(ids) for ids in distinct], kind="stable")
    by_length = [distinct[i] for i in order]
    states = None
    if with_states:
        embeddings, text, mask = encoder.encode_token_ids_with_states(by_length, batch_size=batch_size)
        states = (text, mask)
    else:
        embeddings = encoder.encode_token_ids(by_length, batch_size=batch_size)
    row = {ids: i for i, ids in enumerate(distinct)}
    rows = np.argsort(order)[[row[tuple(ids)] for ids in token_ids]]  # into the by-length order
    return embeddings[rows], None if states is None else (states[0][rows], states[1][rows])


def _encode(
    job: _EncodePass,
    catalogues: Sequence[Catalogue],
    codes_out: BinaryIO | None,
    db: sqlite3.Connection,
    first_row: int,
    known_ids: set[str],
) -> _Encoded:
    """One pass over the catalogues in chunks: towers, tokens and the codes of the patch grid pooled
    `pool` x `pool` (the grid the encoder reads); metadata rows into `db`."""
    encoder, config, report = job.encoder, job.config, job.report
    encoded = _Encoded()
    stages = report.stages
    expected = (encoder.config.num_patches, encoder.config.patch_feature_dim)
    token_dtype, max_len = _token_dtype(encoder), encoder.config.max_text_len
    row = first_row

    def timed(stage: str, started: float) -> float:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - started
        return now

    with tqdm(
        total=sum(len(c) for c in catalogues), unit="item", desc="index", disable=not job.progress
    ) as bar:
        for catalogue in catalogues:
            fresh = []
            for item in catalogue.items:
                if item.id in known_ids:
                    report.skipped_duplicate += 1
                    continue
                known_ids.add(item.id)
                fresh.append(item)
            bar.update(len(catalogue) - len(fresh))
            skipped_before = report.skipped_unreadable
            for start in range(0, len(fresh), config.chunk_items):
                chunk = fresh[start : start + config.chunk_items]
                t = time.perf_counter()
                kept, features = job.patch_features(catalogue.subset(chunk))
                t = timed("patch_features", t)
                report.skipped_unreadable += len(chunk) - len(kept)
                bar.update(len(chunk))
                if not len(kept):
                    continue
                assert features.shape[1:] == expected, (
                    f"patch features {features.shape[1:]} do not fit the model {expected}"
                )
                encoded.image_embeddings.append(encoder.encode_images(features, batch_size=config.batch_size))
                t = timed("image_tower", t)

                token_ids = encoder.tokenize([item.text for item in kept.items])
                embeddings, text_states = _encode_texts(
                    encoder, token_ids, config.batch_size, with_states=job.states is not None
                )
                encoded.text_embeddings.append(embeddings)
                t = timed("text_tower", t)

                padded = np.zeros((len(kept), max_len), dtype=token_dtype)
                lengths = np.array([min(len(ids), max_len) for ids in token_ids], dtype=np.uint16)
                for i, ids in enumerate(token_ids):
                    padded[i, : lengths[i]] = ids[:max_len]
                encoded.token_ids.append(padded)
                encoded.token_lengths.append(lengths)
                encoded.groups.extend(item.group for item in kept.items)
                pooled = pool_grid(features, job.pool)
                if codes_out is not None:
                    codes_out.write(encode(job.codec, pooled).tobytes())
                    t = timed("patch_codes", t)
                if job.states is not None and text_states is not None:
                    job.states.write(encoder, *text_states, pooled)
                    t = timed("states", t)

                metadata.insert_items(db, row, kept.items, catalogue.source)
                row += len(kept)
                timed("metadata", t)
                bar.set_postfix(skipped=report.skipped_unreadable, refresh=False)
            encoded.catalogues.append(
                {
                    "name": catalogue.name,
                    "source": catalogue.source,
                    "fingerprint": catalogue.fingerprint(),
                    "items": len(catalogue),
                    "skipped_unreadable": report.skipped_unreadable - skipped_before,
                    "skipped_rows": dict(catalogue.skipped),
                    "added": _now(),
                }
            )
    encoded.rows = row - first_row
    return encoded


def _write_npy_from_raw(raw: Path, out: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Wrap a file of raw C-order bytes as a .npy (header first), streamed: the codes never sit in memory."""
    assert raw.stat().st_size == int(np.prod(shape)) * dtype.itemsize, "raw code bytes do not fill the shape"
    with open(out, "wb") as f, open(raw, "rb") as source:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        shutil.copyfileobj(source, f, 1 << 24)
    raw.unlink()


def _copy_npy_rows(source: Path, out: BinaryIO) -> None:
    """Append the raw bytes of an existing .npy's rows to `out`, a block of rows at a time."""
    array = np.load(source, allow_pickle=False, mmap_mode="r")
    for start in range(0, len(array), 4096):
        out.write(np.ascontiguousarray(array[start : start + 4096]).tobytes())


def _write_querybank(
    folder: Path,
    job: _EncodePass,
    bank_catalogue: Catalogue,
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    groups: Sequence[str],
) -> dict[str, Any]:
    """Draw the bank from `bank_catalogue` (less the gallery's product groups), store it and both indexes'
    offsets; the manifest section."""
    held = set(groups)
    candidates = [item for item in bank_catalogue.items if item.group not in held]
    chosen = draw_bank(len(candidates), job.config.querybank_items, job.config.seed)
    kept, features = job.patch_features(bank_catalogue.subset([candidates[i] for i in chosen]))
    if not len(kept):
        raise BundleError(
            f"querybank catalogue {bank_catalogue.source}: no item outside the gallery's product groups "
            "with a readable image"
        )
    bank = QueryBank.encode(job.encoder, kept, features, job.encoder.tower_logit_scale)
    hashes = group_hashes(groups)
    image_offsets, image_centre = bank.offsets("image", image_embeddings, hashes)
    text_offsets, text_centre = bank.offsets("text", text_embeddings, hashes)
    for name, array in (
        (IMAGE_OFFSETS, image_offsets),
        (TEXT_OFFSETS, text_offsets),
        (BANK_TEXTS, bank.texts.astype(np.float16)),
        (BANK_IMAGES, bank.images.astype(np.float16)),
        (BANK_GROUPS, bank.groups),
    ):
        np.save(folder / name, array, allow_pickle=False)
    return {
        "beta": bank.beta,
        "bank_items": len(kept),
        "catalogue": {
            "name": bank_catalogue.name,
            "source": bank_catalogue.source,
            "fingerprint": bank_catalogue.fingerprint(),
        },
        "centres": {"image": image_centre, "text": text_centre},
    }


def _extend_querybank(
    path: Path,
    staging: Path,
    section: Mapping[str, Any],
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    groups: Sequence[str],
) -> None:
    """Offsets of added rows from the bundle's stored bank, centred as the old rows were; the bank is kept."""
    bank = QueryBank(
        *(np.load(path / name, allow_pickle=False) for name in (BANK_TEXTS, BANK_IMAGES, BANK_GROUPS)),
        beta=float(section["beta"]),
    )
    hashes = group_hashes(groups)
    for name, side, vectors in (
        (IMAGE_OFFSETS, "image", image_embeddings),
        (TEXT_OFFSETS, "text", text_embeddings),
    ):
        new, _ = bank.offsets(side, vectors, hashes, centre=float(section["centres"][side]))
        old = np.load(path / name, allow_pickle=False)
        np.save(staging / name, np.concatenate([old, new]), allow_pickle=False)
    for name in (BANK_TEXTS, BANK_IMAGES, BANK_GROUPS):
        link_or_copy(path / name, staging / name)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Checksum every file, then write the manifest: the last file, whose presence marks a whole bundle."""
    manifest["files"] = file_entries(folder, bundle_files(manifest))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _counts(rows: int, removed: int, skipped: int) -> dict[str, int]:
    return {"rows": rows, "live": rows - removed, "removed": removed, "skipped_unreadable": skipped}


# -- jobs -----------------------------------------------------------------------------------------------


def build_bundle(
    encoder: Encoder,
    catalogues: Catalogue | Iterable[Catalogue],
    patch_features: PatchFeatureSource,
    out: str | Path,
    config: IndexConfig | None = None,
    progress: bool = True,
    querybank: Catalogue | None = None,
) -> JobReport:
    """Encode every item and write a new bundle at `out` (replacing any bundle there, in one step).

    With a `querybank` catalogue, recall is querybank-normalised against items drawn from it
    (`model.querybank`); its items of the gallery's product groups are left out.
    """
    config = config or IndexConfig()
    catalogues = _as_list(catalogues)
    out = Path(out).absolute()
    report = JobReport(out)
    started = time.perf_counter()
    if not sum(len(c) for c in catalogues):
        raise BundleError("no items to index: the catalogues are empty")
    with locked(out), staging_folder(out) as staging:
        t = time.perf_counter()
        pool = encoder.config.patch_pool
        sample = _codec_sample(encoder, catalogues, patch_features, pool, config)
        codec, patch_section = None, None
        states, state_codecs, codecs_section = None, None, None
        if _StateStreams.wanted(encoder):  # a fused model re-ranks from stored states, never patches
            if config.states_codec:
                state_codecs, codecs_section = _train_state_codecs(encoder, sample, config)
                for name, entry in codecs_section.items():
                    faiss.write_index(state_codecs[name], str(staging / entry["file"]))
            states = _StateStreams(staging, encoder, state_codecs, config.text_states_layout)
            report.stages["train_states_codecs"] = time.perf_counter() - t  # drawing the sample too
        else:
            patch_vectors = sample.pooled.reshape(-1, sample.pooled.shape[-1])
            codec, codec_factory = train_codec(patch_vectors, config.patch_codec)
            patch_section = {
                "file": PATCH_CODEC,
                "codes": PATCH_CODES,
                "factory": codec_factory,
                "code_size": codec.sa_code_size(),
                "dim": codec.d,
                "patches_per_item": encoder.config.encoder_patches,
                "bytes_per_item": codec.sa_code_size() * encoder.config.encoder_patches,
                "trained_on_patches": len(patch_vectors),
            }
            report.stages["train_codec"] = time.perf_counter() - t
        del sample  # free the sample before encoding

        db = metadata.create_items_db(staging / ITEMS_DB)
        raw_codes = staging / (PATCH_CODES + ".part")
        try:
            with contextlib.ExitStack() as files:
                codes_out = files.enter_context(open(raw_codes, "wb")) if codec is not None else None
                job = _EncodePass(encoder, patch_features, codec, pool, config, report, progress, states)
                encoded = _encode(job, catalogues, codes_out, db, first_row=0, known_ids=set())
        finally:
            if states is not None:
                states.close()
        db.commit()
        db.close()
        if not encoded.rows:
            raise BundleError(f"no item could be indexed: {report.skipped_unreadable} unreadable images")
        report.rows = report.added = encoded.rows

        t = time.perf_counter()
        image_embeddings = np.concatenate(encoded.image_embeddings)
        text_embeddings = np.concatenate(encoded.text_embeddings)
        # Each index trains on its own modality. One quantizer for both would put half its lists on
        # text vectors, and the modality gap leaves those lists empty in the image index: exactly the
        # lists a text query probes first.
        indexes, factory, trained_on = {}, "", 0
        for name, vectors in ((IMAGE_INDEX, image_embeddings), (TEXT_INDEX, text_embeddings)):
            indexes[name], factory, trained_on = build_index(vectors, config)
        report.stages["recall_indexes"] = time.perf_counter() - t
        querybank_section = None
        if querybank is not None:
            t = time.perf_counter()
            querybank_section = _write_querybank(
                staging, job, querybank, image_embeddings, text_embeddings, encoded.groups
            )
            report.stages["querybank"] = time.perf_counter() - t

        t = time.perf_counter()
        for name, index in indexes.items():
            faiss.write_index(index, str(staging / name))
        if codec is not None:
            faiss.write_index(codec, str(staging / PATCH_CODEC))
            code_shape = (encoded.rows, encoder.config.encoder_patches, codec.sa_code_size())
            _write_npy_from_raw(raw_codes, staging / PATCH_CODES, np.dtype(np.uint8), code_shape)
        np.save(staging / TOKEN_IDS, np.concatenate(encoded.token_ids), allow_pickle=False)
        np.save(staging / TOKEN_LENGTHS, np.concatenate(encoded.token_lengths), allow_pickle=False)
        states_section = states.finish(encoded.rows) if states is not None else None
        if states_section is not None and codecs_section is not None:
            states_section["codecs"] = codecs_section

        report.seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            "updated": _now(),
            "model": _model_section(encoder),
            "catalogues": encoded.catalogues,
            "counts": _counts(encoded.rows, 0, report.skipped_unreadable),
            "indexes": {
                "factory": factory,
                "metric": "inner_product",
                "normalized": True,
                "dim": int(image_embeddings.shape[1]),
                "nlist": inverted_lists(indexes[IMAGE_INDEX]),
                "nprobe": config.nprobe,
                "refine_k_factor": config.refine_k_factor,
                "trained_on": trained_on,
                "built_on": "gpu" if config.use_gpu and gpu_available() else "cpu",
                "image": {"file": IMAGE_INDEX, "searched_by": "text queries"},
                "text": {"file": TEXT_INDEX, "searched_by": "image queries"},
            },
            "tokens": {
                "file": TOKEN_IDS,
                "lengths": TOKEN_LENGTHS,
                "dtype": _token_dtype(encoder).name,
                "max_len": encoder.config.max_text_len,
            },
            "config": config.to_dict(),
            "build": {
                "seconds": round(report.seconds, 3),
                "items_per_second": round(report.items_per_second, 2),
                "stages": {k: round(v, 3) for k, v in report.stages.items()},
            },
            "history": [
                {
                    "op": "build",
                    "at": _now(),
                    "added": encoded.rows,
                    "skipped_unreadable": report.skipped_unreadable,
                }
            ],
        }
        if querybank_section is not None:
            manifest["querybank"] = querybank_section
        if patch_section is not None:
            manifest["patch_codec"] = patch_section
        if states_section is not None:
            manifest["states"] = states_section
        _write_manifest(staging, manifest)
        report.stages["write"] = time.perf_counter() - t
        publish(staging, out)
    report.seconds = time.perf_counter() - started
    logger.info(
        "built %s: %d items (%s), %d unreadable skipped, %.0f items/s",
        out,
        report.rows,
        factory,
        report.skipped_unreadable,
        report.items_per_second,
    )
    return report


def _open_for_update(path: Path, fingerprint: str | None) -> dict[str, Any]:
    """The manifest of a bundle about to be updated, after refusing a wrong model or damaged files."""
    manifest = read_manifest(path)
    check_model(manifest, fingerprint, path)
    verify_files(path, manifest, checksums=True)  # never carry a corrupt file into the new bundle
    return manifest


def add_to_bundle(
    encoder: Encoder,
    path: str | Path,
    catalogues: Catalogue | Iterable[Catalogue],
    patch_features: PatchFeatureSource,
    progress: bool = True,
) -> JobReport:
    """Append new items with the bundle's trained quantizers and codec (no retraining); ids present are skipped."""
    path = Path(path).absolute()
    catalogues = _as_list(catalogues)
    report = JobReport(path)
    started = time.perf_counter()
    with locked(path):
        manifest = _open_for_update(path, encoder.fingerprint)
        if dict(encoder.config.patch_features) != manifest["model"]["patch_features"]:
            raise BundleError(f"{path}: the model's patch-feature config differs from the bundle's")
        config = IndexConfig.from_dict(manifest["config"])
        old_rows = manifest["counts"]["rows"]
        with staging_folder(path) as staging:
            shutil.copy2(path / ITEMS_DB, staging / ITEMS_DB)
            codec = None
            if "patch_codec" in manifest:
                link_or_copy(path / PATCH_CODEC, staging / PATCH_CODEC)
                codec = faiss.read_index(str(path / PATCH_CODEC))
            db = sqlite3.connect(staging / ITEMS_DB)
            raw_codes = staging / (PATCH_CODES + ".part")
            states = None
            if "states" in manifest:
                layout = manifest["states"].get("text_layout", "padded")  # bundles before stop 34: padded
                states = _StateStreams(staging, encoder, _read_state_codecs(path, manifest), layout)
                for entry in manifest["states"].get("codecs", {}).values():
                    link_or_copy(path / entry["file"], staging / entry["file"])
            try:
                with contextlib.ExitStack() as files:
                    codes_out = None
                    if codec is not None:
                        codes_out = files.enter_context(open(raw_codes, "wb"))
                        _copy_npy_rows(path / PATCH_CODES, codes_out)
                    if states is not None:
                        states.copy_rows(path)
                    # The bundle's stored grid decides the pooling (bundles before pooling kept every patch).
                    pool = math.isqrt(encoder.config.num_patches // stored_patches(manifest))
                    job = _EncodePass(encoder, patch_features, codec, pool, config, report, progress, states)
                    encoded = _encode(job, catalogues, codes_out, db, old_rows, metadata.live_ids(db))
            finally:
                if states is not None:
                    states.close()
            db.commit()
            db.close()
            report.added = encoded.rows
            report.rows = old_rows + encoded.rows
            if not encoded.rows:
                logger.info("%s: nothing new to add; the bundle is unchanged", path)
                report.seconds = time.perf_counter() - started
                return report

            t = time.perf_counter()
            for name, vectors in (
                (IMAGE_INDEX, encoded.image_embeddings),
                (TEXT_INDEX, encoded.text_embeddings),
            ):
                index = faiss.read_index(str(path / name))
                assert index.ntotal == old_rows, (
                    f"{name} holds {index.ntotal} vectors, the bundle {old_rows} rows"
                )
                index = add_vectors(index, np.concatenate(vectors), config.use_gpu)
                faiss.write_index(index, str(staging / name))
            if "querybank" in manifest:
                _extend_querybank(
                    path,
                    staging,
                    manifest["querybank"],
                    np.concatenate(encoded.image_embeddings),
                    np.concatenate(encoded.text_embeddings),
                    encoded.groups,
                )
            report.stages["add_index"] = time.perf_counter() - t
            if (
                choose_factory(report.rows, manifest["indexes"]["dim"], config)
                != manifest["indexes"]["factory"]
            ):
                # The quantizers were sized for the catalogue at build time; they still work, less well.
                logger.warning(
                    "%s: now %d rows; a rebuild would choose %s instead of %s",
                    path,
                    report.rows,
                    choose_factory(report.rows, manifest["indexes"]["dim"], config),
                    manifest["indexes"]["factory"],
                )
            if codec is not None:
                code_shape = (report.rows, stored_patches(manifest), codec.sa_code_size())
                _write_npy_from_raw(raw_codes, staging / PATCH_CODES, np.dtype(np.uint8), code_shape)
            for name, new in ((TOKEN_IDS, encoded.token_ids), (TOKEN_LENGTHS, encoded.token_lengths)):
                old = np.load(path / name, allow_pickle=False)
                np.save(staging / name, np.concatenate([old, *new]), allow_pickle=False)
            if states is not None:
                states.finish(report.rows)  # rows were added (else it returned above): `hidden` is known

            counts = manifest["counts"]
            manifest["counts"] = _counts(
                report.rows, counts["removed"], counts["skipped_unreadable"] + report.skipped_unreadable
            )
            manifest["catalogues"].extend(encoded.catalogues)
            manifest["updated"] = _now()
            manifest["history"].append(
                {
                    "op": "add",
                    "at": _now(),
                    "added": encoded.rows,
                    "skipped_unreadable": report.skipped_unreadable,
                }
            )
            _write_manifest(staging, manifest)
            publish(staging, path)
    report.seconds = time.perf_counter() - started
    logger.info(
        "%s: added %d items (%d unreadable, %d already indexed)",
        path,
        report.added,
        report.skipped_unreadable,
        report.skipped_duplicate,
    )
    return report


def remove_from_bundle(path: str | Path, item_ids: Iterable[str]) -> JobReport:
    """Mark items removed (out of stock) without a rebuild: they never come back from search."""
    path = Path(path).absolute()
    report = JobReport(path)
    started = time.perf_counter()
    with locked(path):
        manifest = _open_for_update(path, None)
        with staging_folder(path) as staging:
            shutil.copy2(path / ITEMS_DB, staging / ITEMS_DB)
            db = sqlite3.connect(staging / ITEMS_DB)
            report.removed, report.unknown = metadata.mark_removed(db, item_ids)
            db.commit()
            removed_total = len(metadata.removed_rows(db))
            db.close()
            report.rows = manifest["counts"]["rows"]
            if not report.removed:
                report.seconds = time.perf_counter() - started
                return report
            for name in manifest["files"]:
                if name != ITEMS_DB:
                    link_or_copy(path / name, staging / name)
            manifest["counts"] = _counts(report.rows, removed_total, manifest["counts"]["skipped_unreadable"])
            manifest["updated"] = _now()
            manifest["history"].append({"op": "remove", "at": _now(), "removed": len(report.removed)})
            _write_manifest(staging, manifest)
            publish(staging, path)
    report.seconds = time.perf_counter() - started
    return report
