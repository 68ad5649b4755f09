"""Bounded load on the real service: mixed text and image searches at a fixed concurrency for a fixed
time (and at most a fixed count), then an overload run against a small queue-depth limit.

Loopback only; it stops by itself. Figures: requests, 5xx, dropped connections, latency percentiles,
resident-memory growth of the server from the minute after the warm-up to the last minute (medians;
the fitted trend and the range beside them), its open file descriptors
during the load and idle before and after;
overload: share answered 503 with Retry-After, how fast those came, and recovery once load drops.

    python -m reliability.load --model RUN/best --index BUNDLE --concurrency 32 --duration 600 --warmup 120
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.report import percentiles_ms, print_table, write_json
from reliability.service import process_figures, running_service

# Options of every load request: the service's two-stage path, small pages.
SEARCH_OPTIONS = {"k": 10, "recall_k": 32, "rerank_k": 16}


@dataclass(frozen=True)
class Query:
    text: str
    image: bytes


@dataclass
class LoadStats:
    """What a load run saw, from the client side."""

    sent: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)  # of 200 answers
    wall_s: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def dropped(self) -> int:
        return sum(self.transport_errors.values())


ResponseCheck = Callable[[str, httpx.Response, float], None]  # (kind, response, sent at) -> None


def bundle_queries(index: Path, count: int = 32) -> list[Query]:
    """Real items' texts and photos from the bundle, used as the load's queries."""
    from index.bundle import Bundle

    with Bundle.open(index, verify_checksums=False) as bundle:
        items = bundle.items(list(range(min(count, bundle.rows))))
    return [Query(item["text"], Path(item["image"]).read_bytes()) for item in items]


async def send_search(client: httpx.AsyncClient, kind: str, query: Query) -> httpx.Response:
    if kind == "text":
        return await client.post("/search/text", json={"query": query.text, **SEARCH_OPTIONS})
    form = {name: str(value) for name, value in SEARCH_OPTIONS.items()}
    return await client.post("/search/image", files={"file": ("q.jpg", query.image)}, data=form)


async def drive(
    base_url: str,
    queries: Sequence[Query],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    check: ResponseCheck | None = None,
    keep_alive: bool = True,
    timeout_s: float = 60.0,
) -> LoadStats:
    """`concurrency` clients send text and image searches (alternating) back to back until the time or
    the count runs out; requests still running at the end are awaited, never abandoned."""
    stats = LoadStats()
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency if keep_alive else 0
    )

    async def client_loop(client: httpx.AsyncClient) -> None:
        while stats.sent < max_requests and time.perf_counter() < deadline:
            number = stats.sent
            stats.sent += 1
            kind = "text" if number % 2 == 0 else "image"
            query = queries[(number // 2) % len(queries)]
            sent_at = time.perf_counter()
            try:
                response = await send_search(client, kind, query)
            except httpx.TransportError as error:
                stats.transport_errors[type(error).__name__] += 1
                continue
            stats.statuses[response.status_code] += 1
            if response.status_code == 200:
                stats.latencies_ms.append(1000 * (time.perf_counter() - sent_at))
            if check is not None:
                check(kind, response, sent_at)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    stats.wall_s = time.perf_counter() - start
    return stats


async def sample_process(pid: int, every_s: float, samples: list[tuple[float, dict[str, float]]]) -> None:
    """Resident memory and open descriptors of the server every `every_s`, until cancelled."""
    start = time.perf_counter()
    while True:
        samples.append((time.perf_counter() - start, process_figures(pid)))
        await asyncio.sleep(every_s)


async def load_with_samples(
    base_url: str,
    pid: int,
    queries: Sequence[Query],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    sample_s: float,
) -> tuple[LoadStats, list[tuple[float, dict[str, float]]], dict[str, float], dict[str, float]]:
    """The load's stats, the server's figures sampled during it, and its figures idle before and after."""
    idle_before = process_figures(pid)
    samples: list[tuple[float, dict[str, float]]] = []
    sampler = asyncio.create_task(sample_process(pid, sample_s, samples))
    try:
        stats = await drive(base_url, queries, concurrency, duration_s, max_requests)
    finally:
        sampler.cancel()
    await asyncio.sleep(1.0)  # let the server close the finished connections
    return stats, samples, idle_before, process_figures(pid)


def after_warmup(
    samples: Sequence[tuple[float, dict[str, float]]], warmup_s: float, name: str
) -> list[tuple[float, float]]:
    """(time, value of `name`) of every sample from the end of the warm-up; the last one if none is."""
    after = [(at, figures[name]) for at, figures in samples if at >= warmup_s]
    return after or [(samples[-1][0], samples[-1][1][name])]


def growth(
    samples: Sequence[tuple[float, dict[str, float]]], warmup_s: float, name: str, window_s: float = 60.0
) -> tuple[float, float]:
    """(median over the first `window_s` after the warm-up, median over the last `window_s`).

    Resident memory swings with the requests in flight (tens of MiB at concurrency 32, freed when they
    finish); one sample at each end measures where the swing happened to be, not growth. A leak moves
    the whole level, so it moves both medians apart."""
    after = after_warmup(samples, warmup_s, name)
    first, last = after[0][0], after[-1][0]
    start = [value for at, value in after if at <= first + window_s]
    end = [value for at, value in after if at >= last - window_s]
    return statistics.median(start), statistics.median(end)


def trend_per_minute(samples: Sequence[tuple[float, dict[str, float]]], warmup_s: float, name: str) -> float:
    """Least-squares slope of `name` after the warm-up, per minute: a leak's steady climb."""
    after = after_warmup(samples, warmup_s, name)
    if len(after) < 2:
        return 0.0
    times, values = zip(*after, strict=True)
    return 60.0 * statistics.linear_regression(times, values).slope


async def overload(
    base_url: str, queries: Sequence[Query], concurrency: int, duration_s: float, recovery_s: float
) -> dict[str, Any]:
    """Far more concurrent searches than the queue admits, then a trickle: 503s must carry Retry-After
    and come fast, and the trickle must be served again."""
    refused_ms: list[float] = []
    without_retry_after = 0

    def check(kind: str, response: httpx.Response, sent_at: float) -> None:
        nonlocal without_retry_after
        if response.status_code == 503:
            refused_ms.append(1000 * (time.perf_counter() - sent_at))
            if not response.headers.get("retry-after") or response.json()["error"]["code"] != "overloaded":
                without_retry_after += 1

    flood = await drive(base_url, queries, concurrency, duration_s, 10**9, check)
    recovery = await drive(base_url, queries, 1, recovery_s, 10**9)
    return {
        "flood_sent": flood.sent,
        "flood_ok": flood.statuses[200],
        "flood_503": flood.statuses[503],
        "flood_other_errors": flood.sent - flood.statuses[200] - flood.statuses[503],
        "flood_dropped": flood.dropped,
        "refused_without_retry_after": without_retry_after,
        "refused_latency": percentiles_ms(refused_ms),
        "served_latency": percentiles_ms(flood.latencies_ms),
        "recovery_sent": recovery.sent,
        "recovery_ok": recovery.statuses[200],
    }


def run(
    model: Path,
    index: Path,
    workdir: Path,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_s: float,
    sample_s: float,
    overload_depth: int,
    overload_concurrency: int,
    overload_s: float,
) -> dict[str, Any]:
    queries = bundle_queries(index)
    with running_service(model, index, workdir / "load.server.log") as service:
        stats, samples, idle_before, idle_after = asyncio.run(
            load_with_samples(
                service.base_url, service.pid, queries, concurrency, duration_s, max_requests, sample_s
            )
        )
        tracebacks = service.log().count("Traceback")
    rss_start, rss_end = growth(samples, warmup_s, "rss_mib")
    fds_start, fds_end = growth(samples, warmup_s, "fds")
    fds_max = max(value for _, value in after_warmup(samples, warmup_s, "fds"))
    rss_after = [value for _, value in after_warmup(samples, warmup_s, "rss_mib")]
    settings = {"max_queue_depth": overload_depth}
    with running_service(model, index, workdir / "overload.server.log", settings) as service:
        flood = asyncio.run(
            overload(service.base_url, queries, overload_concurrency, overload_s, recovery_s=overload_s / 2)
        )
    return {
        "concurrency": concurrency,
        "duration_s": stats.wall_s,
        "requests": stats.sent,
        "ok": stats.statuses[200],
        "server_errors": stats.server_errors,
        "other_statuses": {str(s): n for s, n in stats.statuses.items() if s != 200},
        "dropped": stats.dropped,
        "qps": stats.sent / stats.wall_s,
        "latency": percentiles_ms(stats.latencies_ms),
        "warmup_s": warmup_s,
        "rss_mib_after_warmup": rss_start,
        "rss_mib_end": rss_end,
        "rss_growth_pct": 100 * (rss_end - rss_start) / rss_start,
        "rss_trend_mib_per_min": trend_per_minute(samples, warmup_s, "rss_mib"),
        "rss_mib_range_after_warmup": [min(rss_after), max(rss_after)],
        "fds_after_warmup": fds_start,
        "fds_end": fds_end,
        "fds_max_after_warmup": fds_max,
        "fds_idle_before": idle_before["fds"],
        "fds_idle_after": idle_after["fds"],
        "rss_mib_idle_after": idle_after["rss_mib"],
        "tracebacks_in_log": tracebacks,
        "samples": samples,
        "overload": {"queue_depth": overload_depth, "concurrency": overload_concurrency, **flood},
    }


def print_result(result: dict[str, Any]) -> None:
    latency = result["latency"]
    flood = result["overload"]
    low, high = result["rss_mib_range_after_warmup"]
    print_table(
        f"Load: mixed text and image searches, concurrency {result['concurrency']}, "
        f"{result['duration_s']:.0f} s",
        [
            ("requests sent", result["requests"]),
            ("answered 200", result["ok"]),
            ("5xx answers", result["server_errors"]),
            ("dropped connections", result["dropped"]),
            ("throughput, requests/s", result["qps"]),
            (
                "latency p50 / p95 / p99, ms",
                f"{latency['p50_ms']:.0f} / {latency['p95_ms']:.0f} / {latency['p99_ms']:.0f}",
            ),
            (
                f"resident memory, median of the minute after {result['warmup_s']:.0f} s -> of the last, MiB",
                f"{result['rss_mib_after_warmup']:.0f} -> {result['rss_mib_end']:.0f} ({result['rss_growth_pct']:+.1f}%)",
            ),
            (
                "resident memory after the warm-up: trend MiB/min; range MiB; idle after",
                f"{result['rss_trend_mib_per_min']:+.1f}; {low:.0f}-{high:.0f}; {result['rss_mib_idle_after']:.0f}",
            ),
            (
                "open file descriptors: idle before / after warm-up -> end (max) / idle after",
                f"{result['fds_idle_before']:.0f} / {result['fds_after_warmup']:.0f} -> {result['fds_end']:.0f} "
                f"({result['fds_max_after_warmup']:.0f}) / {result['fds_idle_after']:.0f}",
            ),
            ("tracebacks in the server log", result["tracebacks_in_log"]),
            (
                f"overload: queue depth {flood['queue_depth']}, concurrency {flood['concurrency']}",
                f"{flood['flood_sent']} sent, {flood['flood_ok']} served, {flood['flood_503']} refused 503, "
                f"{flood['flood_other_errors']} other",
            ),
            ("overload: 503 without Retry-After", flood["refused_without_retry_after"]),
            (
                "overload: latency of 503s / of served, p50 and p99, ms",
                f"{flood['refused_latency']['p50_ms']:.0f}, {flood['refused_latency']['p99_ms']:.0f} / "
                f"{flood['served_latency']['p50_ms']:.0f}, {flood['served_latency']['p99_ms']:.0f}",
            ),
            (
                "recovery at concurrency 1: served / sent",
                f"{flood['recovery_ok']} / {flood['recovery_sent']}",
            ),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--index", type=Path, required=True, help="bundle built for that checkpoint")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many")
    parser.add_argument("--warmup", type=float, default=120.0, help="memory growth is measured from here")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--overload-depth", type=int, default=4, help="max_queue_depth of the overload run")
    parser.add_argument("--overload-concurrency", type=int, default=32)
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="load-") as workdir:
        result = run(
            args.model,
            args.index,
            Path(workdir),
            args.concurrency,
            args.duration,
            args.max_requests,
            args.warmup,
            args.sample_every,
            args.overload_depth,
            args.overload_concurrency,
            args.overload_seconds,
        )
    print_result(result)
    write_json(args.out, result)
    flood = result["overload"]
    ok = (
        result["server_errors"] == 0
        and result["dropped"] == 0
        and result["rss_growth_pct"] < 5
        and result["fds_idle_after"] <= result["fds_idle_before"]
        and result["fds_max_after_warmup"] <= result["fds_after_warmup"] + 2
        and flood["flood_503"] > 0
        and flood["refused_without_retry_after"] == 0
        and flood["recovery_ok"] == flood["recovery_sent"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
