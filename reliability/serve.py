"""`python -m reliability.serve --port P`: the real service as `fashionbert serve` runs it, plus faults
a request can trigger, so the fault suite can break one request and watch the others.

A text query containing `FAULT:slow-encode` / `FAULT:fail-encode` makes its model call
slow (by `--slow-s` seconds) or fail; `FAULT:fail-rerank` makes every cross-encoder
call that holds that query's pairs fail; an uploaded file containing `FAULT:slow-decode` /
`FAULT:fail-decode` makes its decode slow or fail. Nothing else changes: real model, bundle and routes.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import uvicorn

import app.retrieval
from app.main import create_app
from app.metrics import Metrics
from app.retrieval import SearchService, load_service
from app.settings import Settings
from model.pair_states import PairStates

logger = logging.getLogger(__name__)

SLOW_ENCODE, FAIL_ENCODE, FAIL_RERANK = "FAULT:slow-encode", "FAULT:fail-encode", "FAULT:fail-rerank"
SLOW_DECODE, FAIL_DECODE = b"FAULT:slow-decode", b"FAULT:fail-decode"


class InjectedFault(RuntimeError):
    """What an injected failure raises: an error the service did not expect."""


class FaultyInference:
    """The real model, with the marked queries' calls slowed down or failed."""

    def __init__(self, inference: Any, slow_s: float) -> None:
        self._inference = inference
        self._slow_s = slow_s
        self._poisoned: set[tuple[int, ...]] = set()
        # A marked query's text states, once however often it is sent: how its pairs are recognised.
        self._poisoned_states: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inference, name)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        token_ids = self._inference.tokenize(texts)
        for text, ids in zip(texts, token_ids, strict=True):
            if SLOW_ENCODE in text:
                time.sleep(self._slow_s)
            if FAIL_ENCODE in text:
                raise InjectedFault("injected model failure while encoding the query")
            if FAIL_RERANK in text:
                with self._lock:
                    self._poisoned.add(tuple(ids))
        return token_ids

    def text_states(self, token_ids: Sequence[Sequence[int]], *args: Any, **kwargs: Any) -> Any:
        """The real states; a marked query's are remembered, to recognise its pairs in a re-rank batch."""
        states, mask = self._inference.text_states(token_ids, *args, **kwargs)
        with self._lock:
            for row, ids in enumerate(token_ids):
                if tuple(ids) in self._poisoned:
                    self._poisoned_states.setdefault(tuple(ids), states[row, : len(ids)].copy())
        return states, mask

    def score_states(self, pairs: PairStates, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            poisoned = any(_holds(pairs, states) for states in self._poisoned_states.values())
        if poisoned:
            raise InjectedFault("injected model failure while re-ranking")
        return self._inference.score_states(pairs, *args, **kwargs)


def _holds(pairs: PairStates, states: np.ndarray) -> bool:
    """Whether a pair of the batch has `states` (T, H) as its whole text side."""
    length = len(states)
    if pairs.text.shape[1] < length:
        return False
    same = np.all(pairs.text[:, :length] == states, axis=(1, 2)) & (pairs.text_mask.sum(1) == length)
    return bool(same.any())


def faulty_decoder(slow_s: float) -> Any:
    real_decode = app.retrieval.decode_image

    def decode(data: bytes, max_pixels: int) -> Any:
        if SLOW_DECODE in data:
            time.sleep(slow_s)
        if FAIL_DECODE in data:
            raise InjectedFault("injected decoder crash")
        return real_decode(data, max_pixels)

    return decode


def faulty_loader(slow_s: float) -> Any:
    def load(settings: Settings, metrics: Metrics) -> SearchService:
        service = load_service(settings, metrics)
        service.inference = FaultyInference(service.inference, slow_s)
        return service

    return load


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow-s", type=float, default=3.0, help="how long a slow fault stalls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    app.retrieval.decode_image = faulty_decoder(args.slow_s)
    uvicorn.run(
        create_app(settings, loader=faulty_loader(args.slow_s)),
        host="127.0.0.1",
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
