"""ModelLane: model calls take turns, and a hung one is abandoned at its deadline instead of holding the rest."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.model_lane import ModelLane, ModelLaneExhausted

pytestmark = pytest.mark.anyio


class Overlap:
    """A model call stand-in that records how many calls ever ran at once."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, value: int, seconds: float = 0.02) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(seconds)
        with self.lock:
            self.running -= 1
        return value * 2


async def test_calls_take_turns_and_return_their_own_results() -> None:
    lane, call = ModelLane(timeout_s=5.0), Overlap()
    results = await asyncio.gather(*(lane.run(call, value) for value in range(6)))
    assert results == [0, 2, 4, 6, 8, 10]
    assert call.most == 1
    lane.shutdown()


async def test_a_hung_call_is_abandoned_at_its_deadline_and_the_next_runs() -> None:
    lane, release = ModelLane(timeout_s=0.3), threading.Event()
    hung = asyncio.ensure_future(lane.run(release.wait))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await lane.run(Overlap(), 21) == 42  # waited for the deadline, not for the hung call
    assert time.monotonic() - started < 2.0
    with pytest.raises(asyncio.TimeoutError):
        await hung
    assert lane.abandoned == 1 and not lane.exhausted
    release.set()
    for _ in range(100):  # the abandoned call returns and frees its thread
        if lane.abandoned == 0:
            break
        await asyncio.sleep(0.01)
    assert lane.abandoned == 0
    lane.shutdown()


async def test_a_caller_that_stops_waiting_keeps_the_turn_until_the_deadline() -> None:
    lane, release, call = ModelLane(timeout_s=0.3), threading.Event(), Overlap()
    gone = asyncio.ensure_future(lane.run(release.wait))
    await asyncio.sleep(0.01)
    gone.cancel()  # e.g. its client left: the call itself still runs on the model thread
    started = time.monotonic()
    assert await lane.run(call, 1) == 2
    assert time.monotonic() - started >= 0.25  # no overlap with the still-running call before its deadline
    assert lane.abandoned == 1
    release.set()
    lane.shutdown()


async def test_past_max_abandoned_the_lane_refuses_until_a_stuck_call_returns() -> None:
    lane, release = ModelLane(timeout_s=0.1, max_abandoned=1), threading.Event()
    for _ in range(2):
        with pytest.raises(asyncio.TimeoutError):
            await lane.run(release.wait)
    assert lane.exhausted
    with pytest.raises(ModelLaneExhausted):
        await lane.run(Overlap(), 1)
    release.set()
    for _ in range(100):
        if not lane.exhausted:
            break
        await asyncio.sleep(0.01)
    assert await lane.run(Overlap(), 4) == 8
    lane.shutdown()


async def test_model_calls_share_one_thread_until_one_is_abandoned() -> None:
    # One thread, so the process keeps one OpenMP team (module docstring). A pool of spare threads would
    # sometimes hand a call to a second one: when the next call is submitted before the thread that ran the
    # last call reports itself idle, which thousands of queued calls make near certain.
    lane, release = ModelLane(timeout_s=0.3), threading.Event()
    ran_on = {await lane.run(threading.get_ident) for _ in range(20)}
    for _ in range(3):
        ran_on |= set(await asyncio.gather(*(lane.run(threading.get_ident) for _ in range(2000))))
    assert len(ran_on) == 1
    with pytest.raises(asyncio.TimeoutError):
        await lane.run(release.wait)
    after = {await lane.run(threading.get_ident) for _ in range(20)}
    assert len(after) == 1 and after != ran_on  # a spare thread took over from the stuck one
    release.set()
    lane.shutdown()
