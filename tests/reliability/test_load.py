"""A short bounded load and overload run (the README's figures come from the 10-minute one)."""

from __future__ import annotations

from pathlib import Path

from reliability import load


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
