"""The search service: encode the query -> recall candidates from the index -> re-rank with cross-attention.

`SearchService` holds the model and the serving bundle. A bundle reload replaces `self.bundle` in one
assignment; each search reads that reference once, so a request that started on the old bundle ends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from PIL import Image

from app.batching import MicroBatcher
from app.errors import ApiError
from app.images import decode_image
from app.metrics import Metrics
from app.model_lane import ModelLane, ModelLaneExhausted, single_threaded_torch
from app.settings import Settings
from model.evaluation import Scorer
from model.pair_states import PairStates
from model.ranking import rerank_order

logger = logging.getLogger(__name__)

Modality = Literal["text", "image"]
_T = TypeVar("_T")


class SearchBundle(Protocol):
    """What the service needs from an index bundle (`index.bundle.Bundle`)."""

    manifest: dict[str, Any]
    size: int  # live (searchable) items

    def search_images(
        self, query_embeddings: np.ndarray, k: int, nprobe: int | None = None, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def search_texts(
        self, query_embeddings: np.ndarray, k: int, nprobe: int | None = None, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def patch_features(self, rows: np.ndarray) -> np.ndarray: ...

    def token_ids(self, rows: np.ndarray) -> list[list[int]]: ...

    # Bundles of models with a fusion layer store each item's side states below it (`stores_states`).
    stores_states: bool

    def text_states(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def image_states(self, rows: np.ndarray) -> np.ndarray: ...

    def items(self, rows: np.ndarray) -> list[dict[str, Any]]: ...

    def item(self, item_id: str) -> dict[str, Any] | None: ...

    def rows_matching(self, filters: dict[str, str]) -> np.ndarray: ...

    def image_path(self, item_id: str) -> Path | None: ...


class Matcher(Scorer, Protocol):
    """What the service needs from the model (`model.inference.FashionBertInference`): what evaluation
    scores with, plus the fingerprint a bundle must have been built for."""

    fingerprint: str

    def match(
        self,
        token_ids: Sequence[Sequence[int]],
        patch_features: np.ndarray,
        batch_size: int = ...,
        tower_similarity: np.ndarray | None = None,
    ) -> np.ndarray:
        """As `Scorer.match`; `tower_similarity` hands over the recall stage's cosines."""
        ...

    def pool_patches(self, patch_features: np.ndarray) -> np.ndarray:
        """The patch network's grid -> the grid the encoder reads, as bundles store it."""
        ...

    def text_states(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Texts' side of re-rank pairs: (n, T, H) states below the fusion layer and the (n, T) mask."""
        ...

    def image_states(self, patch_features: np.ndarray) -> np.ndarray:
        """Images' side of re-rank pairs: (n, N, H) states below the fusion layer."""
        ...

    def score_states(self, pairs: PairStates) -> np.ndarray:
        """Cross-encoder logits of pairs given as side states: (n,)."""
        ...


class PatchExtractor(Protocol):
    def extract(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# An encoded upload, so warm-up runs the decoder too.
_WARM_UP_IMAGE = _png(Image.new("RGB", (64, 64), "white"))

# Item fields a search may filter on (exact match on the bundle's values), plus `metadata.<field>`.
FILTER_FIELDS = ("category", "subcategory", "group")


def is_filter_field(name: str) -> bool:
    field_name = name.removeprefix("metadata.")
    return name in FILTER_FIELDS or (name != field_name and field_name.replace("_", "").isalnum())


@dataclass(frozen=True)
class SearchOptions:
    """One search's knobs, already checked against the configured maxima."""

    k: int
    offset: int = 0
    recall_k: int = 200
    rerank_k: int = 50
    rerank: bool = True
    filters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    item: dict[str, Any]
    recall_score: float
    rerank_score: float | None

    @property
    def score(self) -> float:
        """What ranked this hit: the cross-encoder logit if it was re-ranked, else the recall similarity."""
        return self.rerank_score if self.rerank_score is not None else self.recall_score


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    total: int  # ranked candidates before pagination
    timings_ms: dict[str, float]
    model: dict[str, Any]
    index: dict[str, Any]


class SearchService:
    """Model + serving bundle + re-rank batcher; one per app, created in the lifespan."""

    def __init__(
        self,
        inference: Matcher,
        extractor: PatchExtractor,
        bundle: SearchBundle,
        settings: Settings,
        metrics: Metrics | None = None,
        bundle_path: Path | None = None,
        device: str = "cpu",
        bundle_opener: Callable[[Path], SearchBundle] | None = None,
    ) -> None:
        self.inference = inference
        self.extractor = extractor
        self.bundle = bundle
        self.bundle_path = bundle_path
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = device
        self.bundle_opener = bundle_opener or self._open_bundle
        self.ready = False
        # Model calls take turns on a model thread: never overlapping (no contention for cores or GPU),
        # never on the event loop (torch releases the GIL while it computes), and a hung one is abandoned
        # at its deadline instead of holding every call behind it.
        self.model_lane = ModelLane(settings.model_call_timeout_s, settings.max_abandoned_model_calls)
        # Index work (faiss search, patch decoding, stored states, opening bundles) on threads whose faiss
        # runs on `faiss_threads` (OpenMP's thread count is each thread's own): faiss' workers spin after a
        # call and would take a core from the model thread's next one.
        self.index_threads = ThreadPoolExecutor(
            settings.index_threads,
            thread_name_prefix="index",
            initializer=_set_faiss_threads,
            initargs=(settings.faiss_threads,),
        )
        self.metrics.model_calls_abandoned.set_function(lambda: self.model_lane.abandoned)
        self.batcher = MicroBatcher(
            self._score,
            PairStates.concat,
            run=self.model_lane.run,
            window_s=settings.batch_window_ms / 1000.0,
            max_batch_pairs=settings.max_batch_pairs,
            on_batch=self._observe_batch,
            in_flight=lambda: self._in_flight,
        )
        self._in_flight = 0
        self._reload_lock = asyncio.Lock()
        self.metrics.set_model(self.model_info)
        self.metrics.set_index(self.index_info(bundle))

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher and, if configured, warm up; `ready` turns true at the end."""
        self.batcher.start()
        if self.settings.warm_up:
            await self.warm_up(self.bundle)
        self.ready = True
        self.metrics.ready.set(1)

    async def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        await self.batcher.close()
        self.model_lane.shutdown()
        self.index_threads.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self, bundle: SearchBundle) -> None:
        """One text and one image search through every stage, so the first user pays no one-off costs."""
        start = time.perf_counter()
        options = SearchOptions(
            k=self.settings.default_k,
            recall_k=self.settings.default_recall_k,
            rerank_k=self.settings.default_rerank_k,
        )
        await self.search_text("warm-up query", options, bundle=bundle, record=False)
        await self.search_image(_WARM_UP_IMAGE, options, bundle=bundle, record=False)
        logger.info("warm-up done in %.0f ms", 1000 * (time.perf_counter() - start))

    async def reload(self, path: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Open and warm up a bundle off the event loop, then swap it in; (previous, new) index info.

        Anything wrong with the new bundle (unreadable, wrong model, arrays that do not fit) refuses the
        reload and the old bundle keeps serving.
        """
        if self._reload_lock.locked():
            raise ApiError(409, "reload_in_progress", "another reload is still running")
        async with self._reload_lock:
            path = path if path is not None else self.bundle_path
            if path is None:
                raise ApiError(422, "bad_bundle", "no bundle path given and none configured")
            try:
                bundle = await self._in_index_thread(self.bundle_opener, path)  # faiss reads indexes
                await self.warm_up(bundle)  # proves the bundle fits the model before it serves anyone
            except Exception as error:  # any failure to open or search the new bundle refuses it
                logger.warning("reload of %s refused: %s", path, error)
                self.metrics.reloads.labels(outcome="refused").inc()
                raise ApiError(
                    422, "bad_bundle", f"bundle refused, the old one keeps serving: {error}"
                ) from error
            previous = self.index_info()
            self.bundle = bundle  # the swap: requests that already hold the old bundle finish on it
            self.bundle_path = path
            self.metrics.set_index(self.index_info(bundle))
            self.metrics.reloads.labels(outcome="ok").inc()
            logger.info("serving bundle %s (%s)", path, self.index_info(bundle))
            return previous, self.index_info(bundle)

    # -- what the API shows -----------------------------------------------------------------------------

    @property
    def model_info(self) -> dict[str, Any]:
        return {
            "fingerprint": self.inference.fingerprint[:16],
            "device": self.device,
            "precision": self.inference.precision,
        }

    def index_info(self, bundle: SearchBundle | None = None) -> dict[str, Any]:
        bundle = bundle if bundle is not None else self.bundle
        return {"version": bundle_version(bundle.manifest), "items": int(bundle.size)}

    def item(self, item_id: str) -> dict[str, Any] | None:
        return self.bundle.item(item_id)

    def image_path(self, item_id: str) -> Path | None:
        """The bundle's recorded image file for an item; ids are looked up, never joined into paths."""
        path = self.bundle.image_path(item_id)
        return path if path is not None and path.is_file() else None

    # -- search ---------------------------------------------------------------------------------------

    async def search_text(
        self, query: str, options: SearchOptions, bundle: SearchBundle | None = None, record: bool = True
    ) -> SearchOutcome:
        """Text query -> product images: recall on the image index, re-rank (query text, candidate image)."""
        return await self._search("text", query, options, bundle, record)

    async def search_image(
        self,
        image: bytes | Image.Image,
        options: SearchOptions,
        bundle: SearchBundle | None = None,
        record: bool = True,
    ) -> SearchOutcome:
        """Image query (an uploaded file's bytes, or a decoded image) -> products: recall on the text
        index, re-rank (candidate text, query image)."""
        return await self._search("image", image, options, bundle, record)

    async def _search(
        self,
        modality: Modality,
        query: str | bytes | Image.Image,
        options: SearchOptions,
        bundle: SearchBundle | None,
        record: bool,
    ) -> SearchOutcome:
        """Encode the query, recall from the other modality's index, re-rank; `modality` is the query's."""
        with self._admitted(record):
            bundle = bundle if bundle is not None else self.bundle  # this request's bundle, to the end
            search = bundle.search_images if modality == "text" else bundle.search_texts
            timer = _StageTimer()
            with timer("encode"):
                query_side, embedding = await self._encode(modality, query)
            with timer("recall"):
                rows, recall_scores = await self._stage(
                    "recall", self._in_index_thread(self._recall, bundle, search, embedding, options)
                )
            with timer("rerank"):
                rerank_scores = await self._stage(
                    "rerank", self._rerank(bundle, modality, query_side, rows, recall_scores, options)
                )
            return self._outcome(bundle, modality, rows, recall_scores, rerank_scores, options, timer, record)

    # -- stages ---------------------------------------------------------------------------------------

    async def _stage(self, name: str, work: Awaitable[_T], timeout_s: float | None = None) -> _T:
        """One stage under its time limit: past it 504, an unexpected failure 503, both as JSON errors.

        A timed-out model call cannot be interrupted; it finishes on the model thread, unanswered.
        """
        timeout_s = timeout_s if timeout_s is not None else self.settings.stage_timeout_s
        try:
            return await asyncio.wait_for(work, timeout_s)
        except ApiError:
            raise
        except asyncio.TimeoutError as error:  # the builtin TimeoutError only from 3.11
            # The stage's own limit, or its model call's (app.model_lane), which says so in the error.
            reason = str(error) or f"the {name} stage took longer than {timeout_s:g} s"
            logger.warning("%s: %s", name, reason)
            raise ApiError(504, "stage_timeout", f"{name}: {reason}") from error
        except ModelLaneExhausted as error:
            raise ApiError(
                503, "model_stuck", "model calls are stuck; retry shortly", headers={"Retry-After": "5"}
            ) from error
        except Exception as error:
            logger.exception("the %s stage failed", name)
            raise ApiError(503, "stage_failed", f"the {name} stage failed; retry shortly") from error

    async def _encode(self, modality: Modality, query: str | bytes | Image.Image) -> tuple[Any, np.ndarray]:
        """The query's side of every re-rank pair (token ids, or (1, N, D) patch features) and its (1, E)
        embedding."""
        if modality == "text":
            return await self._stage("encode", self._in_model_thread(self._encode_text, query))
        # Decoding is CPU work too: off the event loop, not on the model's thread.
        if isinstance(query, bytes):
            query = await self._stage(
                "decode",
                asyncio.to_thread(decode_image, query, self.settings.max_image_pixels),
                self.settings.decode_timeout_s,
            )
        return await self._stage("encode", self._in_model_thread(self._encode_image, query))

    async def _in_index_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.index_threads, fn, *args)

    def _encode_text(self, query: str) -> tuple[list[int], np.ndarray]:
        token_ids = self.inference.tokenize([query])  # truncated to the model's text length
        return token_ids[0], self.inference.encode_token_ids(token_ids)  # (1, E)

    def _encode_image(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        # Pooled like the bundle's grids, so image and text queries' pairs batch together.
        patch_features = self.inference.pool_patches(self.extractor.extract([image]))  # (1, N, D)
        return patch_features, self.inference.encode_images(patch_features)  # (1, E)

    def _recall(
        self, bundle: SearchBundle, search: Any, embedding: np.ndarray, options: SearchOptions
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `recall_k` rows (and their similarities) that pass the filters, best first."""
        allowed = None
        if options.filters:
            try:
                allowed = np.asarray(bundle.rows_matching(options.filters), dtype=np.int64)
            except ValueError as error:  # a filter key the bundle cannot filter on
                raise ApiError(422, "unknown_filter", str(error)) from error
            if len(allowed) == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # The filter is applied inside the index, so a small category still fills recall_k.
        scores, rows = search(embedding, options.recall_k, nprobe=self.settings.nprobe, rows=allowed)
        keep = rows[0] >= 0  # -1 pads a catalogue (or category) smaller than recall_k
        return rows[0][keep], scores[0][keep]

    async def _rerank(
        self,
        bundle: SearchBundle,
        modality: Modality,
        query_side: Any,
        rows: np.ndarray,
        recall_scores: np.ndarray,
        options: SearchOptions,
    ) -> np.ndarray:
        """Cross-encoder logits for the best `rerank_k` candidates, in recall order.

        The logit's tower term is the recall score itself (the same cosine, from the index), so no
        candidate goes through a tower again: an image query's candidate texts are never re-embedded.
        Candidates' sides come from the bundle's stored states where it has them (a model with a fusion
        layer: the pass then runs only the layers above it), else from their tokens and patch codes."""
        count = min(options.rerank_k, len(rows)) if options.rerank else 0
        if count == 0:
            return np.zeros(0, np.float32)
        # The query's own side below the fusion layer, once for all its candidates.
        if modality == "text":
            query_states = await self._in_model_thread(self.inference.text_states, [query_side])
        else:
            query_states = await self._in_model_thread(self.inference.image_states, query_side)
        scores = []
        # Chunks of one batch each keep a brute-force request's candidates from all sitting in memory.
        for start in range(0, count, self.settings.max_batch_pairs):
            stop = min(count, start + self.settings.max_batch_pairs)
            chunk, similarity = rows[start:stop], recall_scores[start:stop]
            if modality == "text":  # (query text, candidate image)
                text, mask = (np.broadcast_to(a, (len(chunk), *a.shape[1:])) for a in query_states)
                image = await self._candidate_images(bundle, chunk)
            else:  # (candidate text, query image)
                text, mask = await self._candidate_texts(bundle, chunk)
                image = np.broadcast_to(query_states, (len(chunk), *query_states.shape[1:]))
            scores.append(await self.batcher.score(PairStates(text, mask, image, similarity)))
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    async def _candidate_images(self, bundle: SearchBundle, rows: np.ndarray) -> np.ndarray:
        if bundle.stores_states:
            return await self._in_index_thread(bundle.image_states, rows)
        patch_features = await self._in_index_thread(bundle.patch_features, rows)  # (n, N, D)
        return await self._in_model_thread(self.inference.image_states, patch_features)

    async def _candidate_texts(self, bundle: SearchBundle, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if bundle.stores_states:
            return await self._in_index_thread(bundle.text_states, rows)
        token_ids = await self._in_index_thread(bundle.token_ids, rows)
        return await self._in_model_thread(self.inference.text_states, token_ids)

    def _outcome(
        self,
        bundle: SearchBundle,
        modality: Modality,
        rows: np.ndarray,
        recall_scores: np.ndarray,
        rerank_scores: np.ndarray,
        options: SearchOptions,
        timer: _StageTimer,
        record: bool,
    ) -> SearchOutcome:
        reranked = len(rerank_scores)
        page = rerank_order(rerank_scores, len(rows))[options.offset : options.offset + options.k]
        items = bundle.items(rows[page]) if len(page) else []
        hits = [
            Hit(
                item=item,
                recall_score=float(recall_scores[i]),
                rerank_score=float(rerank_scores[i]) if i < reranked else None,
            )
            for item, i in zip(items, page, strict=True)
        ]
        timings = timer.finish()
        if record:
            for stage, ms in timings.items():
                self.metrics.stage_seconds.labels(search=modality, stage=stage).observe(ms / 1000.0)
        return SearchOutcome(
            hits=hits,
            total=len(rows),
            timings_ms=timings,
            model=self.model_info,
            index=self.index_info(bundle),
        )

    # -- plumbing -------------------------------------------------------------------------------------

    def _open_bundle(self, path: Path) -> SearchBundle:
        return open_bundle(path, self.inference.fingerprint, self.settings.verify_checksums)

    def _score(self, pairs: PairStates) -> np.ndarray:
        return self.inference.score_states(pairs)  # looked up per call: `inference` may be swapped

    def _observe_batch(self, pairs: int, requests: int, seconds: float) -> None:
        self.metrics.rerank_batch_pairs.observe(pairs)
        self.metrics.rerank_batch_requests.observe(requests)
        self.metrics.rerank_pairs.inc(pairs)
        self.metrics.rerank_compute_seconds.inc(seconds)
        self.metrics.rerank_queue.set(self.batcher.queued)

    async def _in_model_thread(self, fn: Any, *args: Any) -> Any:
        return await self.model_lane.run(fn, *args)

    @contextlib.contextmanager
    def _admitted(self, record: bool = True) -> Iterator[None]:
        """Refuse work beyond the queue depth limit (503 + Retry-After) rather than queue without end."""
        if record and self._in_flight >= self.settings.max_queue_depth:
            raise ApiError(
                503, "overloaded", "too many searches in flight; retry shortly", headers={"Retry-After": "1"}
            )
        self._in_flight += 1
        self.metrics.queue_depth.set(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.queue_depth.set(self._in_flight)


class _StageTimer:
    """Milliseconds per named stage, plus the total since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = 1000.0 * (time.perf_counter() - start)

    def finish(self) -> dict[str, float]:
        return {**self.timings, "total": 1000.0 * (time.perf_counter() - self.start)}


def bundle_version(manifest: dict[str, Any]) -> str:
    """A short, stable name for a bundle: the hash of its manifest, which lists every file's sha256."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def open_bundle(path: Path, model_fingerprint: str | None, verify_checksums: bool = True) -> SearchBundle:
    """Open a bundle built for this model; `index.bundle.BundleError` says what is wrong otherwise."""
    from index.bundle import Bundle

    return Bundle.open(path, expected_model_fingerprint=model_fingerprint, verify_checksums=verify_checksums)


def _set_faiss_threads(count: int) -> None:
    import faiss

    faiss.omp_set_num_threads(count)


def load_service(settings: Settings, metrics: Metrics | None = None) -> SearchService:
    """Load the model, its patch network and the bundle named in `settings` (blocking: minutes at most)."""
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    assert settings.model_dir is not None and settings.index_dir is not None, (
        "model and index must be configured"
    )
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    with single_threaded_torch():  # off the model thread, which runs all other torch work (app.model_lane)
        inference = FashionBertInference.from_checkpoint(
            settings.model_dir,
            device=settings.device,
            bf16_weights=settings.bf16_weights,
            int8_matching=settings.int8_matching,
        )
        # The patch network the model was trained on, from its config: the service believes the checkpoint.
        extractor = PatchFeatureExtractor(
            PatchFeatureConfig.from_dict(inference.config.patch_features), device=inference.device
        )
    bundle = open_bundle(settings.index_dir, inference.fingerprint, settings.verify_checksums)
    logger.info(
        "loaded model %s on %s and bundle %s", settings.model_dir, inference.device, settings.index_dir
    )
    return SearchService(
        inference,
        extractor,
        bundle,
        settings,
        metrics,
        bundle_path=settings.index_dir,
        device=str(inference.device),
    )
