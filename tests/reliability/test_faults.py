"""Fault injection against the real service and indexer: every fault injected is survived."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reliability import faults


def _report(found: list[faults.Fault]) -> list[str]:
    faults.print_result(found)
    return [f"{f.suite}: {f.name}: {f.detail}" for f in found if not f.survived]


def test_one_bad_request_gets_503_or_504_and_the_others_are_served(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    found = faults.stage_faults(tiny_checkpoint, reliability_bundles["a"], tmp_path)
    assert len(found) == 5
    assert not _report(found)
    by_name = {f.name: f.figures for f in found}
    assert [by_name[name]["status"] for name in by_name] == [504, 503, 503, 503, 504]
    # Every neighbour served, the slow model call's too: it is abandoned at its deadline (app.model_lane).
    for name in by_name:
        assert by_name[name]["neighbours_served"] == by_name[name]["neighbours_sent"] > 0, name
    assert all(f["after_served"] == f["after_sent"] > 0 for f in by_name.values())


def test_bad_bundles_at_start_up_never_serve(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    found = faults.startup_faults(tiny_checkpoint, reliability_bundles["a"], tmp_path)
    assert len(found) == 10
    assert not _report(found)


def test_reload_under_load_drops_nothing_and_mixes_no_bundles(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    fault = faults.reload_fault(tiny_checkpoint, reliability_bundles, tmp_path, duration_s=10.0)
    assert not _report([fault])
    # At least two swaps with both bundles answering searches (a loaded machine manages few more in 10 s).
    assert fault.figures["reloads"] >= 2 and min(fault.figures["served_by"].values()) > 0
    assert fault.figures["ok"] == fault.figures["requests"]


def test_sigterm_under_load_finishes_in_flight_and_refuses_new(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    fault = faults.sigterm_fault(tiny_checkpoint, reliability_bundles["a"], tmp_path, shutdown_timeout_s=10.0)
    assert not _report([fault])
    assert fault.figures["in_flight_served"] == fault.figures["in_flight_at_sigterm"] > 0


def test_indexer_killed_mid_build_leaves_no_partial_bundle(
    tiny_checkpoint: Path, shared_data: Path, hm_slice: Any, feature_cache_dir: Path, tmp_path: Path
) -> None:
    points = ("encoding (patch codes streaming)", "arrays written")
    found = faults.indexer_kill_faults(
        tiny_checkpoint, f"hm:{shared_data / 'hm'}", 32, feature_cache_dir, tmp_path, points
    )
    assert len(found) == 4
    assert not _report(found)
    assert all("NOT KILLED" not in f.detail for f in found)
