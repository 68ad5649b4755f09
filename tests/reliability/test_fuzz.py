"""schemathesis against the real service's OpenAPI schema: no 5xx, every answer as documented."""

from __future__ import annotations

from pathlib import Path

from reliability import fuzz


def test_generated_requests_get_documented_answers(
    tiny_checkpoint: Path, reliability_bundles: dict[str, Path], tmp_path: Path
) -> None:
    result = fuzz.run(tiny_checkpoint, reliability_bundles["a"], tmp_path, examples=25, seed=0)
    fuzz.print_result(result)
    assert result["operations"] >= 8
    assert result["requests"] >= 150
    assert result["server_errors"] == 0
    assert result["failing_requests"] == 0, result["failures"]
    assert result["tracebacks_in_log"] == 0
    # Both valid and invalid requests were generated: the answers include successes and refusals.
    assert "200" in result["statuses"] and "422" in result["statuses"]
