"""Fixtures for the HTTP layer: apps over the fake model and bundle, driven in-process through ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.main import create_app
from app.metrics import Metrics
from app.retrieval import SearchService
from app.settings import Settings
from tests.app.fakes import FakeBundle, FakeExtractor, FakeInference, make_items


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the settings they pass, not the developer's environment."""
    import os

    for name in list(os.environ):
        if name.startswith("FASHIONBERT_"):
            monkeypatch.delenv(name)


def make_settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, batch_window_ms=1.0, **overrides)


@pytest.fixture
def fake_items(tmp_path: Path) -> list[dict[str, Any]]:
    return make_items(tmp_path / "images")


@pytest.fixture
def fake_bundle(fake_items: list[dict[str, Any]]) -> FakeBundle:
    return FakeBundle(fake_items)


def fake_loader(
    bundle: FakeBundle, bundles: dict[Path, FakeBundle] | None = None
) -> Callable[[Settings, Metrics], SearchService]:
    """A loader for `create_app`: the fake model over `bundle`; reloads open `bundles[path]`."""

    def open_bundle(path: Path) -> FakeBundle:
        if bundles is None or path not in bundles:
            raise ValueError(f"{path}: not a bundle")
        return bundles[path]

    def load(settings: Settings, metrics: Metrics) -> SearchService:
        return SearchService(
            FakeInference(),
            FakeExtractor(),
            bundle,
            settings,
            metrics,
            bundle_path=Path("/bundles/current"),
            bundle_opener=open_bundle,
        )

    return load


@contextlib.asynccontextmanager
async def serve_asgi(app: FastAPI, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give a client that talks to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            if wait_ready:
                await wait_until_ready(client)
            yield client


async def wait_until_ready(client: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (await client.get("/readyz")).status_code != 200:
        assert loop.time() < deadline, "the app did not become ready"
        await asyncio.sleep(0.01)


@pytest.fixture
async def client(fake_bundle: FakeBundle) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(), loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        yield client


@contextlib.contextmanager
def live_server(app: FastAPI, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def ready_client(app: FastAPI, timeout_s: float = 60.0) -> Iterator[httpx.Client]:
    """`live_server(app)` and an HTTP client to it, once /readyz says the model and bundle are loaded."""
    with live_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        deadline = time.monotonic() + timeout_s
        while client.get("/readyz").status_code != 200:
            assert app.state.startup_error is None, app.state.startup_error
            assert time.monotonic() < deadline, "the service did not get ready"
            time.sleep(0.1)
        yield client
