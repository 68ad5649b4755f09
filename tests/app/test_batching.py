"""MicroBatcher: concurrent requests share one model call and each gets exactly its own scores back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from app.batching import MicroBatcher
from app.model_lane import ModelLane

pytestmark = pytest.mark.anyio


@dataclass
class Pairs:
    """A request's pairs as the batcher sees them: anything with a length that its `concat` can join."""

    token_ids: list[list[int]]
    patch_features: np.ndarray  # (n, N, D)
    tower_similarity: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.token_ids)

    @staticmethod
    def concat(parts: Sequence[Pairs]) -> Pairs:
        return Pairs(
            [ids for part in parts for ids in part.token_ids],
            np.concatenate([part.patch_features for part in parts]),  # raises when grids differ
            np.concatenate([part.tower_similarity for part in parts]),
        )


def reference_scores(pairs: Pairs) -> np.ndarray:
    """A pairwise score that depends on every part of each pair, to catch a mis-sliced batch."""
    texts = np.array([sum(ids) for ids in pairs.token_ids], np.float32)
    return texts + pairs.patch_features.sum(axis=(1, 2)) + 1000.0 * pairs.tower_similarity


def batcher_of(score_fn: Callable[[Pairs], np.ndarray], **options: Any) -> MicroBatcher[Pairs]:
    return MicroBatcher(score_fn, Pairs.concat, **options)


class RecordingScorer:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, pairs: Pairs) -> np.ndarray:
        self.batches.append(len(pairs))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        return reference_scores(pairs)


def request(seed: int, pairs: int) -> Pairs:
    rng = np.random.default_rng(seed)
    token_ids = [list(rng.integers(0, 100, rng.integers(2, 6))) for _ in range(pairs)]
    return Pairs(token_ids, rng.standard_normal((pairs, 3, 2)).astype(np.float32), rng.random(pairs))


async def test_concurrent_requests_share_a_batch_and_get_their_own_slice() -> None:
    scorer = RecordingScorer()
    lane = ModelLane(timeout_s=10.0)
    batcher = batcher_of(scorer, run=lane.run, window_s=0.05, max_batch_pairs=1000)
    requests = [request(seed, pairs) for seed, pairs in enumerate([3, 1, 7, 5, 2])]
    results = await asyncio.gather(*(batcher.score(r) for r in requests))
    await batcher.close()
    lane.shutdown()
    assert scorer.batches == [18]  # one model call for all five requests
    for r, scores in zip(requests, results, strict=True):
        np.testing.assert_allclose(scores, reference_scores(r))
    assert all(name.startswith("model") for name in scorer.threads)  # never on the event loop's thread


async def test_batches_respect_the_maximum_and_keep_requests_whole() -> None:
    scorer = RecordingScorer()
    batcher = batcher_of(scorer, window_s=0.05, max_batch_pairs=8)
    requests = [request(seed, 3) for seed in range(5)] + [request(99, 20)]
    results = await asyncio.gather(*(batcher.score(r) for r in requests))
    await batcher.close()
    assert scorer.batches == [6, 6, 3, 20]  # 3+3 fit in 8; a request bigger than a batch goes alone
    for r, scores in zip(requests, results, strict=True):
        np.testing.assert_allclose(scores, reference_scores(r))


async def test_requests_arriving_while_the_model_is_busy_form_the_next_batch() -> None:
    scorer = RecordingScorer(delay_s=0.1)
    batcher = batcher_of(scorer, window_s=0.0, max_batch_pairs=100)
    first = asyncio.create_task(batcher.score(request(0, 2)))
    await asyncio.sleep(0.03)  # the first batch is now running
    later = [asyncio.create_task(batcher.score(request(seed, 2))) for seed in range(1, 6)]
    await asyncio.gather(first, *later)
    await batcher.close()
    assert scorer.batches == [2, 10]


async def test_a_lone_request_waits_no_longer_than_the_window() -> None:
    batcher = batcher_of(RecordingScorer(), window_s=0.02, max_batch_pairs=100)
    loop = asyncio.get_running_loop()
    await batcher.score(request(0, 1))  # first call starts the worker
    start = loop.time()
    await batcher.score(request(1, 1))
    assert loop.time() - start < 0.5
    await batcher.close()


async def test_no_window_when_no_other_request_is_in_flight() -> None:
    in_flight = 1
    batcher = batcher_of(RecordingScorer(), window_s=5.0, max_batch_pairs=100, in_flight=lambda: in_flight)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await batcher.score(request(0, 1))  # alone: scored at once, not after the 5 s window
    assert loop.time() - start < 1.0
    in_flight = 2  # another search might still bring pairs: the window holds the batch open for it
    lone = asyncio.create_task(batcher.score(request(1, 1)))
    await asyncio.sleep(0.2)
    assert not lone.done()
    company = asyncio.create_task(batcher.score(request(2, 1)))
    # Both in the batch, nobody else in flight: it goes at once, long before the window closes.
    await asyncio.wait_for(asyncio.gather(lone, company), 1.0)
    await batcher.close()


async def test_a_failing_request_fails_alone_and_the_batcher_goes_on() -> None:
    poison = -1  # a token id that makes the model raise, wherever it sits in a batch
    calls: list[int] = []

    def fragile(pairs: Pairs) -> np.ndarray:
        calls.append(len(pairs))
        if any(poison in ids for ids in pairs.token_ids):
            raise RuntimeError("the model failed on this input")
        return reference_scores(pairs)

    batcher = batcher_of(fragile, window_s=0.05)
    good = [request(seed, 2) for seed in range(3)]
    bad = request(9, 2)
    bad.token_ids[1] = [poison]
    results = await asyncio.gather(
        *(batcher.score(r) for r in good),
        batcher.score(bad),
        return_exceptions=True,
    )
    assert isinstance(results[-1], RuntimeError)
    for r, scores in zip(good, results[:-1], strict=True):
        np.testing.assert_allclose(scores, reference_scores(r))
    assert calls == [8, 2, 2, 2, 2]  # the shared batch failed, then each request was scored by itself
    last = request(7, 4)
    np.testing.assert_allclose(await batcher.score(last), reference_scores(last))
    await batcher.close()


async def test_requests_that_cannot_share_a_batch_are_scored_alone() -> None:
    """Arrays that do not concatenate (another patch grid) must not stop the batcher."""
    scorer = RecordingScorer()
    batcher = batcher_of(scorer, window_s=0.05)
    first, second = request(1, 2), request(2, 3)
    other_grid = Pairs(second.token_ids, np.ones((3, 5, 2), np.float32), second.tower_similarity)
    results = await asyncio.wait_for(asyncio.gather(batcher.score(first), batcher.score(other_grid)), 10)
    np.testing.assert_allclose(results[0], reference_scores(first))
    np.testing.assert_allclose(results[1], reference_scores(other_grid))
    assert scorer.batches == [2, 3]  # no joint call: each by itself
    np.testing.assert_allclose(await batcher.score(second), reference_scores(second))  # still running
    await batcher.close()


async def test_cancelled_requests_are_not_scored() -> None:
    scorer = RecordingScorer()
    batcher = batcher_of(scorer, window_s=0.05)
    gone = asyncio.create_task(batcher.score(request(0, 5)))
    kept = asyncio.create_task(batcher.score(request(1, 2)))
    await asyncio.sleep(0.01)
    gone.cancel()
    await kept
    await batcher.close()
    assert scorer.batches == [2]


async def test_empty_requests_and_close_fail_waiters() -> None:
    scorer = RecordingScorer(delay_s=0.2)
    batcher = batcher_of(scorer, window_s=0.0, max_batch_pairs=1)
    assert len(await batcher.score(Pairs([], np.zeros((0, 3, 2), np.float32), np.zeros(0)))) == 0
    running = asyncio.create_task(batcher.score(request(0, 1)))
    queued = asyncio.create_task(batcher.score(request(1, 1)))
    await asyncio.sleep(0.05)
    await batcher.close()
    for task in (running, queued):
        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await task


async def test_a_hung_batch_times_out_and_the_next_batch_is_scored() -> None:
    release = threading.Event()
    hang_on = 777

    def scorer(pairs: Pairs) -> np.ndarray:
        if any(hang_on in ids for ids in pairs.token_ids):
            release.wait()
        return reference_scores(pairs)

    lane = ModelLane(timeout_s=0.3)
    batcher = batcher_of(scorer, run=lane.run, window_s=0.0)
    hung_request = request(0, 2)
    hung_request.token_ids[0] = [hang_on]
    hung = asyncio.create_task(batcher.score(hung_request))
    await asyncio.sleep(0.05)
    later = request(1, 3)
    # Queued behind the hung batch: scored once the lane abandons it, not when (if ever) it returns.
    np.testing.assert_allclose(await asyncio.wait_for(batcher.score(later), 5), reference_scores(later))
    with pytest.raises(asyncio.TimeoutError):
        await hung
    release.set()
    await batcher.close()
    lane.shutdown()
