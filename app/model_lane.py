"""One model call at a time, off the event loop, and a hung call cannot hold the calls behind it.

Model calls take turns: they never overlap, so none competes with another for the cores or the GPU. A
call past `timeout_s` is abandoned: its caller gets `TimeoutError` (a 504) and the next call starts at
once on a spare thread. Python cannot kill a thread, so an abandoned call runs on until it returns. The
lane serves on beside up to `max_abandoned` such calls; one more and it refuses calls (`ModelLaneExhausted`,
a 503, and /readyz says not ready) until one returns, so an orchestrator replaces a stuck process rather
than it piling up threads.

Model calls also share one thread, and model loading runs torch on one core (`single_threaded_torch`).
libgomp gives each thread that runs parallel torch work its own OpenMP team, and once the process holds
more team threads than cores it cuts every team's spin-wait short: on 2 cores the CNN's pass over a query
photo then took 25-32 ms instead of 15 (README, "Compute threads"). A spare thread replaces the model thread only when a call is
abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
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
        self._thread_name_prefix = thread_name_prefix
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=thread_name_prefix)  # the model thread
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
            # The stuck call keeps its thread, which ends when the call returns; the next calls get a new one.
            self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name_prefix)
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


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch work in this block, on this thread, uses one core: for work off the model thread (loading),
    so that the model thread's OpenMP team stays the process's only one (see the module docstring)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # threads that start later read it; this one runs no more torch
