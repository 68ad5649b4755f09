"""The serving process keeps its compute threads from competing for the cores: torch runs on one OpenMP
team (model calls share one thread, and loading, off that thread, starts no team of its own), and faiss
searches on one thread. A second torch team, or faiss threads spinning after a search, slow every model
call on 2 cores (app.model_lane, README "Compute threads")."""

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


@needs_cores
def test_index_work_runs_faiss_on_one_thread(
    tiny_checkpoint: Path, hm_slice: Any, build_slice_bundle: Any, tmp_path: Path
) -> None:
    import faiss

    from app.main import create_app
    from app.settings import Settings
    from tests.app.conftest import ready_client

    catalogue = hm_slice[0]
    bundle = build_slice_bundle(catalogue.items[:8], tmp_path / "bundle")
    settings = Settings(
        _env_file=None,
        model_dir=tiny_checkpoint,
        index_dir=bundle,
        device="cpu",
        admin_api_key="admin",
        index_threads=2,
    )
    app = create_app(settings)
    with ready_client(app) as client:
        service, seen = app.state.service, []
        assert service.index_threads._max_workers == 2  # FASHIONBERT_INDEX_THREADS

        def recording(read: Any, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                seen.append((name, faiss.omp_get_max_threads()))
                return read(*args, **kwargs)

            return call

        for name in ("search_images", "search_texts", "patch_features"):
            setattr(service.bundle, name, recording(getattr(service.bundle, name), name))
        item = catalogue.items[3]
        assert client.post("/search/text", json={"query": item.text}).status_code == 200
        upload = {"file": ("q.jpg", catalogue.image_bytes(item), "image/jpeg")}
        assert client.post("/search/image", files=upload).status_code == 200
        # A reload reads the new bundle's faiss indexes on an index thread too.
        service.bundle_opener = recording(service.bundle_opener, "open bundle")
        assert client.post("/admin/reload", headers={"X-API-Key": "admin"}).status_code == 200
    assert {name for name, _ in seen} == {"search_images", "search_texts", "patch_features", "open bundle"}
    assert {threads for _, threads in seen} == {1}
