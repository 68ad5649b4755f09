"""The serving process runs torch on one OpenMP team: model calls share one thread, and loading (off that
thread) starts no team of its own. A second team slows every torch call on 2 cores (app.model_lane)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Threads the process holds after `work` runs on a new thread, minus those before; printed by a fresh
# interpreter, so no earlier test's OpenMP teams count.
_THREADS_STARTED = """
import os, sys, threading
def threads(): return len(os.listdir("/proc/self/task"))
def measure(work):
    out = {}
    def run():
        before = threads()
        work()
        out["started"] = threads() - before
    thread = threading.Thread(target=run)
    thread.start(); thread.join()
    return out["started"]
"""


def _threads_started(body: str, *args: str) -> list[int]:
    script = _THREADS_STARTED + body
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(line) for line in done.stdout.split()]


needs_cores = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
    reason="counts OpenMP worker threads: Linux with 2 or more cores",
)


@needs_cores
def test_single_threaded_torch_starts_no_openmp_team() -> None:
    alone, plain = _threads_started(
        """
import contextlib
import torch
from app.model_lane import single_threaded_torch
def work(single):
    def run():
        with single_threaded_torch() if single else contextlib.nullcontext():
            torch.ones(8_000_000).mul_(2).sum()
    return run
print(measure(work(True)))
print(measure(work(False)))
"""
    )
    assert plain > 0, "the measure should see the team a thread's parallel torch work starts"
    assert alone == 0


@needs_cores
def test_loading_the_service_starts_no_openmp_team(
    tiny_checkpoint: Path, hm_slice: Any, build_slice_bundle: Any, tmp_path: Path
) -> None:
    bundle = build_slice_bundle(hm_slice[0].items[:8], tmp_path / "bundle")
    (started,) = _threads_started(
        """
import model.inference, model.patch_features  # imported first: importing may start threads of its own
from app.retrieval import load_service
from app.settings import Settings
settings = Settings(_env_file=None, model_dir=sys.argv[1], index_dir=sys.argv[2], device="cpu")
print(measure(lambda: load_service(settings)))
""",
        str(tiny_checkpoint),
        str(bundle),
    )
    assert started == 0
