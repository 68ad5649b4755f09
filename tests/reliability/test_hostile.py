"""The hostile-input corpus against the real service: every request refused with a 4xx JSON error."""

from __future__ import annotations

from pathlib import Path

from reliability import hostile


def test_every_hostile_request_is_refused_cleanly(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    result = hostile.run(tiny_checkpoint, reliability_bundles["a"], tmp_path)
    hostile.print_result(result)
    wrong = [o for o in result["outcomes"] if not o["ok"]]
    assert result["inputs"] >= 40
    assert not wrong, wrong
    assert result["server_errors"] == 0 and result["unanswered"] == 0
    assert result["tracebacks_in_log"] == 0
    assert result["healthy_after"]
    by_name = {o["name"]: o for o in result["outcomes"]}
    assert by_name["PNG bomb (144 M pixels)"]["code"] == "image_too_large"
    assert by_name["lying Content-Length (1 TB declared)"]["status"] == 413
    assert by_name["escaped NUL in the query"]["code"] == "invalid_query"
