"""Property-based API fuzzing: schemathesis generates requests for every operation of the service's own
OpenAPI schema (valid and invalid ones) and checks each answer: never a 5xx, a documented status code and
content type, and a body that matches the documented schema.

    python -m reliability.fuzz --model RUN/best --index BUNDLE --examples 50 [--out fuzz.json]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import schemathesis
from schemathesis.checks import Failure, FailureGroup, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reliability.report import print_table, write_json
from reliability.service import running_service

ADMIN_KEY = "fuzz-admin-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(base_url: str, examples: int, seed: int) -> dict[str, Any]:
    """Up to `examples` valid and `examples` invalid generated requests per operation, each sent and
    checked; failures are collected, not raised, so every operation gets its full budget."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    requests: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, list[str]] = collections.defaultdict(list)
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in schemathesis.GenerationMode:  # schema-valid requests, then schema-violating ones

            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: bounded
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.seed(seed)
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case: Any) -> None:
                label = case.operation.label
                response = case.call(base_url=base_url, headers={"X-API-Key": ADMIN_KEY}, timeout=60)
                requests[label] += 1
                statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except (Failure, FailureGroup) as error:
                    failures[label].append(f"{response.status_code}: {str(error).splitlines()[0]}")

            try:
                exercise()
            except hypothesis.errors.Unsatisfiable:  # nothing to violate: an operation without inputs
                continue
    return {
        "operations": len(operations),
        "requests": sum(requests.values()),
        "per_operation": dict(requests),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "server_errors": sum(count for status, count in statuses.items() if status >= 500),
        "failures": {label: found[:5] for label, found in failures.items()},
        "failing_requests": sum(len(found) for found in failures.values()),
    }


def run(model: Path, index: Path, workdir: Path, examples: int, seed: int) -> dict[str, Any]:
    settings = {"admin_api_key": ADMIN_KEY}
    with running_service(model, index, workdir / "fuzz.server.log", settings) as service:
        start = time.perf_counter()
        result = fuzz(service.base_url, examples, seed)
        result["seconds"] = time.perf_counter() - start
        result["tracebacks_in_log"] = service.log().count("Traceback")
    return result


def print_result(result: dict[str, Any]) -> None:
    for label, found in result["failures"].items():
        for failure in found:
            print(f"FAIL {label}: {failure}")
    print_table(
        "Schema fuzzing (schemathesis)",
        [
            ("operations fuzzed", result["operations"]),
            ("requests generated and sent", result["requests"]),
            ("status codes seen", ", ".join(f"{s}: {n}" for s, n in result["statuses"].items())),
            ("5xx answers", result["server_errors"]),
            ("answers not matching the schema (status, content type, body)", result["failing_requests"]),
            ("tracebacks in the server log", result["tracebacks_in_log"]),
            ("seconds", result["seconds"]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--index", type=Path, required=True, help="bundle built for that checkpoint")
    parser.add_argument("--examples", type=int, default=50, help="generated requests per operation at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as workdir:
        result = run(args.model, args.index, Path(workdir), args.examples, args.seed)
    print_result(result)
    write_json(args.out, result)
    return 0 if result["server_errors"] == 0 and result["failing_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
