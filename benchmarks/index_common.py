"""Pieces the index benchmarks share: a stand-in checkpoint when none is given, and plain-text tables.

Import this first: it puts the repository on sys.path and sets OpenMP to sleep rather than spin while
waiting, which on a small shared machine (2 cores, a training run beside) keeps faiss from collapsing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.config import TINY_BERT

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first OpenMP user (faiss, torch)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def stand_in_checkpoint(out: Path, size: str = "tiny", embed_dim: int = 256) -> Path:
    """An untrained checkpoint: "tiny" (random BERT, hidden 64) or "full" (MiniLM-L6 + random heads).

    Fine for speed and size; says nothing about retrieval quality.
    """
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import FashionBertConfig
    from model.patch_features import PatchFeatureConfig
    from model.training import build_model

    torch.manual_seed(0)
    bert = dict(TINY_BERT) if size == "tiny" else {}
    config = FashionBertConfig(bert=bert, embed_dim=embed_dim, patch_features=PatchFeatureConfig().to_dict())
    model, tokenizer = build_model(config, pretrained=size != "tiny")
    return save_checkpoint(model, tokenizer, out, {"note": f"untrained {size} stand-in for benchmarks"})


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}"


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """Rows of equal keys as an aligned text table (numbers right-aligned)."""
    if title:
        print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[c], int | float) for row in rows) for c in columns]
    line = lambda values: "  ".join(  # noqa: E731
        v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
    )
    print(line(columns))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
