"""One model call at a time, off the event loop, and a hung call cannot hold the calls behind it.

Model calls take turns: they never overlap, so none competes with another for the cores or the GPU. A
call past `timeout_s` is abandoned: its caller gets `TimeoutError` (a 504) and the next call starts at
once on a spare thread. Python cannot kill a thread, so an abandoned call runs on until it returns. The
lane serves on beside up to `max_abandoned` such calls; one more and it refuses calls (`ModelLaneExhausted`,
a 503, and /readyz says not ready) until one returns, so an orchestrator replaces a stuck process rather
than it piling up threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class ModelLaneExhausted(RuntimeError):
    """Every spare thread holds an abandoned call: the model is stuck."""


class ModelLane:
    def __init__(self, timeout_s: float, max_abandoned: int = 2, thread_name_prefix: str = "model") -> None:
        assert timeout_s > 0 and max_abandoned >= 0
        self.timeout_s = timeout_s
        self.max_abandoned = max_abandoned
        self.abandoned = 0  # abandoned calls still running
        self._executor = ThreadPoolExecutor(1 + max_abandoned, thread_name_prefix=thread_name_prefix)
        self._turn: asyncio.Lock | None = None  # made on first use, inside the running loop

    @property
    def exhausted(self) -> bool:
        """Every thread holds an abandoned call."""
        return self.abandoned > self.max_abandoned

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on a model thread when its turn comes, within `timeout_s` of starting."""
        if self._turn is None:
            self._turn = asyncio.Lock()
        turn = self._turn
        await turn.acquire()
        if self.exhausted:
            turn.release()
            raise ModelLaneExhausted(f"{self.abandoned} model calls are stuck past {self.timeout_s:g} s")
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._executor, fn, *args)
        abandoned = False

        def abandon() -> None:
            # At the deadline, whether or not anyone still waits for the call (its caller may be gone).
            nonlocal abandoned
            if call.done() or abandoned:
                return
            abandoned = True
            self.abandoned += 1
            turn.release()
            logger.error(
                "a model call ran past %g s: abandoned (%d running); the next call starts on a spare thread",
                self.timeout_s,
                self.abandoned,
            )

        deadline = loop.call_later(self.timeout_s, abandon)

        def finished(_: asyncio.Future[Any]) -> None:
            deadline.cancel()
            if abandoned:
                self.abandoned -= 1
                logger.warning("an abandoned model call returned; %d still running", self.abandoned)
            else:
                turn.release()  # the turn passes on when the call returns, even if its caller left

        call.add_done_callback(finished)
        try:
            # shield: a caller that stops waiting (its stage timed out, its client left) does not cancel
            # the call, which keeps the turn until it returns or its deadline passes: calls never overlap.
            return await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
            if call.done():  # returned at the very deadline
                return call.result()
            abandon()
            raise asyncio.TimeoutError(f"the model call took longer than {self.timeout_s:g} s") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
