"""Dynamic micro-batching of cross-encoder work: many requests' (text, image) pairs, one model call.

A request's pairs wait at most `window_s` for company, and not at all when no other search is in flight
(`in_flight`) to bring any; whatever queued while the model was busy joins the next batch at once, so
batches grow with load and throughput with them. The model runs through the
caller's `run` (the service's ModelLane: one call at a time on a model thread), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from app.model_lane import ModelLaneExhausted

logger = logging.getLogger(__name__)


class Pairs(Protocol):
    """A request's re-rank pairs (`model.inference.PairStates`): a length, and nothing else the batcher reads."""

    def __len__(self) -> int: ...


P = TypeVar("P", bound=Pairs)
ScoreFn = Callable[[P], np.ndarray]  # pairs -> (n,) logits
ConcatFn = Callable[[Sequence[P]], P]  # several requests' pairs -> one batch (raises if they cannot join)
BatchObserver = Callable[[int, int, float], None]  # (pairs, requests, compute seconds)
RunFn = Callable[..., Awaitable[np.ndarray]]  # run(score_fn, *args) off the event loop


@dataclass
class _Pending(Generic[P]):
    pairs: P
    future: asyncio.Future[np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.pairs)


class MicroBatcher(Generic[P]):
    """Collects `score` calls from concurrent requests and answers each with its slice of one batch."""

    def __init__(
        self,
        score_fn: ScoreFn[P],
        concat: ConcatFn[P],
        run: RunFn | None = None,
        window_s: float = 0.002,
        max_batch_pairs: int = 256,
        on_batch: BatchObserver | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`in_flight`: how many requests could score pairs now (the service's searches in flight, each
        with at most one `score` call pending); None: always wait the window."""
        assert max_batch_pairs >= 1, "a batch must hold at least one pair"
        self.score_fn = score_fn
        self.concat = concat
        self.run = run or asyncio.to_thread
        self.window_s = window_s
        self.max_batch_pairs = max_batch_pairs
        self.on_batch = on_batch
        self.in_flight = in_flight
        self._queue: asyncio.Queue[_Pending[P]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._carry: _Pending[P] | None = None  # a request that did not fit the last batch starts the next

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the one being scored)."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None)

    def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="rerank-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        pending = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the re-ranker shut down"))

    async def score(self, pairs: P) -> np.ndarray:
        """Cross-encoder logits of a request's pairs: (n,) float32."""
        if len(pairs) == 0:
            return np.zeros((0,), np.float32)
        if self._queue is None:
            self.start()
        assert self._queue is not None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(pairs, future))
        return await future

    async def _next_batch(self) -> list[_Pending[P]]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, pairs = [first], len(first)
        deadline = time.monotonic() + self.window_s
        while pairs < self.max_batch_pairs:
            remaining = deadline - time.monotonic()
            if self.in_flight is not None and self._queue.empty() and self.in_flight() <= len(batch):
                break  # every request that could join is already in this batch: waiting adds only latency
            try:
                if remaining > 0:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    item = self._queue.get_nowait()  # past the window: take only what already waits
            except (asyncio.TimeoutError, asyncio.QueueEmpty):  # the builtin TimeoutError only from 3.11
                break
            if pairs + len(item) > self.max_batch_pairs:
                self._carry = item
                break
            batch.append(item)
            pairs += len(item)
        return batch

    async def _run(self) -> None:
        while True:
            batch = [item for item in await self._next_batch() if not item.future.done()]  # drop cancelled
            if not batch:
                continue
            start = time.perf_counter()
            try:
                # Inside the try: requests whose arrays cannot be joined are scored one by one too.
                pairs = self.concat([item.pairs for item in batch])
                scores = await self.run(self.score_fn, pairs)
            except asyncio.CancelledError:  # shutting down: nobody will answer these requests
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("the re-ranker shut down"))
                raise
            except (asyncio.TimeoutError, ModelLaneExhausted) as error:  # the model, not a request, failed
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            except Exception:  # one bad request fails itself, not its batch-mates nor the batcher
                logger.exception("re-rank batch of %d requests failed; scoring them one by one", len(batch))
                await self._score_alone(batch)
                continue
            if self.on_batch is not None:
                self.on_batch(len(pairs), len(batch), time.perf_counter() - start)
            offset = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(scores[offset : offset + len(item)])
                offset += len(item)

    async def _score_alone(self, batch: list[_Pending[P]]) -> None:
        """After a failed batch, score each request by itself so only the one that fails gets the error."""
        for item in batch:
            if item.future.done():
                continue
            start = time.perf_counter()
            try:
                scores = await self.run(self.score_fn, item.pairs)
            except asyncio.CancelledError:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(RuntimeError("the re-ranker shut down"))
                raise
            except Exception as error:
                if not item.future.done():
                    item.future.set_exception(error)
            else:
                if self.on_batch is not None:  # a batch of one, in the metrics like any other
                    self.on_batch(len(item), 1, time.perf_counter() - start)
                if not item.future.done():
                    item.future.set_result(scores)
