"""The real search service in its own process on loopback, as the reliability suites drive it.

Each suite starts `fashionbert serve` (or `reliability.serve`, the same app with request-triggered
faults) with its settings in `FASHIONBERT_*` variables, waits for /readyz, and stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    """A started service: its URL, process and log; `stop()` sends SIGTERM and returns the exit code."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 180.0) -> dict[str, Any]:
        """The /readyz body once it answers 200; raises if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.base_url}/readyz", timeout=5)
                if response.status_code == 200:
                    return response.json()
            time.sleep(0.2)
        raise TimeoutError(f"the service was not ready within {timeout_s} s:\n{self.log()[-3000:]}")

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        """Until /healthz answers (the service may still be loading, or refusing to)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the service did not listen within {timeout_s} s")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL past `timeout_s`, reported as -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_service(
    model: Path,
    index: Path,
    log_path: Path,
    settings: Mapping[str, Any] | None = None,
    faults: bool = False,
    slow_s: float = 3.0,
) -> ServiceProcess:
    """Start the service on a free loopback port; `settings` become FASHIONBERT_<NAME> variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONBERT_")}
    env.update(
        {
            "FASHIONBERT_MODEL_DIR": str(model),
            "FASHIONBERT_INDEX_DIR": str(index),
            "FASHIONBERT_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in (settings or {}).items():
        env[f"FASHIONBERT_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    if faults:  # the real app with request-triggered faults (reliability/serve.py)
        command = [sys.executable, "-m", "reliability.serve", "--port", str(port), "--slow-s", str(slow_s)]
    else:  # exactly what an operator runs
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)


@contextlib.contextmanager
def running_service(
    model: Path,
    index: Path,
    log_path: Path,
    settings: Mapping[str, Any] | None = None,
    faults: bool = False,
    slow_s: float = 3.0,
    ready_timeout_s: float = 180.0,
) -> Iterator[ServiceProcess]:
    """A ready service for the `with` body; stopped (SIGTERM) afterwards whatever happened."""
    service = start_service(model, index, log_path, settings, faults, slow_s)
    try:
        service.wait_ready(ready_timeout_s)
        yield service
    finally:
        service.stop()


def process_figures(pid: int) -> dict[str, float]:
    """Resident memory (MiB) and open file descriptors of a process, from /proc."""
    import psutil

    process = psutil.Process(pid)
    return {"rss_mib": process.memory_info().rss / 2**20, "fds": float(process.num_fds())}
