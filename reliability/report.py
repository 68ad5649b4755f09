"""Figure tables: what every suite prints at its end, and optionally writes as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def percentiles_ms(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of a latency sample in milliseconds (NaN when empty)."""
    if not latencies_ms:
        return {name: float("nan") for name in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(values.max())}


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column Markdown table, ready to paste into the README."""
    print(f"\n{title}\n")
    print("| figure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {format_value(value)} |")


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
