"""A short bounded load and overload run (the README's figures come from the 10-minute one)."""

from __future__ import annotations

from pathlib import Path

from reliability import load


def test_growth_tells_a_climb_from_swings() -> None:
    """Memory that swings with requests in flight is not growth; a steady climb is, whatever the swing."""

    def samples(level):
        return [(float(t), {"rss_mib": level(t)}) for t in range(0, 600, 5)]

    def swing(t):  # 800 MiB, 90 MiB higher whenever a burst is in flight, peaking at the very end
        return 800.0 + (90.0 if t % 40 == 0 or t == 595 else 0.0) - (60.0 if t == 120 else 0.0)

    start, end = load.growth(samples(swing), 120.0, "rss_mib")
    assert (start, end) == (800.0, 800.0)  # single samples would have said 740 -> 890, +20%
    assert abs(load.trend_per_minute(samples(swing), 120.0, "rss_mib")) < 2.0

    def leak(t):  # the same swings on a level that climbs 4 MiB a minute
        return swing(t) + 4.0 * t / 60.0

    start, end = load.growth(samples(leak), 120.0, "rss_mib")
    assert end - start > 25.0  # 8 minutes apart at 4 MiB/min, less the two windows' half-widths
    assert load.trend_per_minute(samples(leak), 120.0, "rss_mib") > 3.0


def test_short_load_and_overload(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    result = load.run(
        tiny_checkpoint,
        reliability_bundles["a"],
        tmp_path,
        concurrency=16,
        duration_s=30.0,
        max_requests=5000,
        warmup_s=10.0,
        sample_s=1.0,
        overload_depth=4,
        overload_concurrency=32,
        overload_s=8.0,
    )
    load.print_result(result)
    assert result["requests"] > 50 and result["ok"] == result["requests"]
    assert result["server_errors"] == 0 and result["dropped"] == 0
    assert result["tracebacks_in_log"] == 0
    # Allocator arenas and thread pools still grow in the first minute: the 10-minute run's bound is 5%
    # after a 2-minute warm-up; this short one only catches a leak that grows with every request.
    assert result["rss_growth_pct"] < 15
    assert result["fds_idle_after"] <= result["fds_idle_before"]  # every connection's descriptor closed
    assert result["fds_max_after_warmup"] <= result["fds_after_warmup"] + 2
    flood = result["overload"]
    assert flood["flood_503"] > 0 and flood["flood_ok"] > 0
    assert flood["refused_without_retry_after"] == 0
    assert flood["flood_other_errors"] == 0 and flood["flood_dropped"] == 0
    assert flood["refused_latency"]["p50_ms"] < flood["served_latency"]["p50_ms"]
    assert flood["recovery_sent"] > 0 and flood["recovery_ok"] == flood["recovery_sent"]
