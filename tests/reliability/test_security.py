"""Security properties that are cheap to prove in-process: no pickle on any load path, constant-time key
checks, upload caps enforced before the body is read. (API keys and CORS from configuration are in
tests/app/test_api.py, the non-root container user in tests/deploy/test_deploy_files.py.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

import app.deps
from app.main import create_app
from tests.app.conftest import fake_loader, make_settings, serve_asgi
from tests.app.fakes import FakeBundle, make_items

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("model", "index", "app", "reliability", "benchmarks")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_bundle(tmp_path: Path) -> FakeBundle:
    return FakeBundle(make_items(tmp_path / "images"))


def _keyword(call: ast.Call, name: str) -> Any:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def pickle_uses(source: str) -> list[str]:
    """Every way this source could unpickle: pickling modules, torch.load without weights_only=True,
    np.load without allow_pickle=False, pandas.read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            if name == "load" and owner == "torch" and _keyword(node, "weights_only") is not True:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy") and _keyword(node, "allow_pickle") is not False:
                found.append(f"line {node.lineno}: np.load without allow_pickle=False")
            if name == "read_pickle":
                found.append(f"line {node.lineno}: read_pickle")
    return found


def test_the_scan_catches_each_way_to_unpickle() -> None:
    source = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
        "torch.load('w.pt')\nnp.load('a.npy')\nnp.load('a.npy', allow_pickle=True)\n"
        "torch.load('w.pt', weights_only=True)\nnp.load('a.npy', allow_pickle=False)\n"
    )
    assert len(pickle_uses(source)) == 5


def test_no_pickle_in_shipped_code() -> None:
    problems = {
        str(path.relative_to(REPO)): found
        for package in SHIPPED
        for path in sorted((REPO / package).rglob("*.py"))
        if (found := pickle_uses(path.read_text()))
    }
    assert not problems, problems


@pytest.mark.anyio
async def test_api_keys_are_compared_in_constant_time(
    fake_bundle: FakeBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = app.deps.secrets.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(app.deps.secrets, "compare_digest", spy)
    settings = make_settings(search_api_key="search-secret", admin_api_key="admin-secret")
    async with serve_asgi(create_app(settings, loader=fake_loader(fake_bundle))) as client:
        wrong = {"X-API-Key": "search-secreX"}
        assert (await client.post("/search/text", json={"query": "red"}, headers=wrong)).status_code == 403
        assert (await client.post("/admin/reload", headers={"X-API-Key": "admin-secreX"})).status_code == 403
    assert compared == [(b"search-secreX", b"search-secret"), (b"admin-secreX", b"admin-secret")]


async def _call_counting(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], chunks: int, size: int, prefix: bytes = b""
) -> tuple[int, int]:
    """Send `prefix`, then `chunks` body chunks of `size` bytes through raw ASGI; (status, bytes pulled)."""
    pulled = 0
    sent = 0
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled, sent
        body = (prefix if sent == 0 else b"") + b"x" * size
        sent += 1
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": sent < chunks}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test"), *headers], "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return status, pulled


@pytest.mark.anyio
async def test_uploads_are_capped_before_the_body_is_read(fake_bundle: FakeBundle) -> None:
    limit = 256 * 1024
    settings = make_settings(max_upload_bytes=limit, max_json_bytes=4096)
    application = create_app(settings, loader=fake_loader(fake_bundle))
    multipart = [(b"content-type", b"multipart/form-data; boundary=b")]
    async with serve_asgi(application):
        # A declared length over the limit: refused before a single byte is pulled.
        declared = [*multipart, (b"content-length", str(10**9).encode())]
        assert await _call_counting(application, "/search/image", declared, 10_000, 65536) == (413, 0)
        # No declared length (chunked): reading stops within one chunk past the limit.
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n\r\n'
        status, pulled = await _call_counting(application, "/search/image", multipart, 10_000, 65536, part)
        assert status == 413 and pulled <= limit + 64 * 1024 + 65536
        body = [(b"content-type", b"application/json")]
        status, pulled = await _call_counting(application, "/search/text", body, 1000, 1024)
        assert status == 413 and pulled <= 4096 + 1024


def test_json_error_bodies_never_echo_the_api_key() -> None:
    """The 403 message names the problem, not the key (keys must not end up in client logs)."""
    from pydantic import SecretStr

    from app.deps import _check_key
    from app.errors import ApiError

    with pytest.raises(ApiError) as caught:
        _check_key(SecretStr("the-real-key"), "a-guess")
    assert "the-real-key" not in json.dumps(caught.value.message) and "a-guess" not in caught.value.message


def test_reload_roots_default_to_the_folder_holding_the_bundle(tmp_path: Path) -> None:
    settings = make_settings(index_dir=tmp_path / "bundles" / "current")
    assert settings.reload_roots() == [(tmp_path / "bundles").resolve()]
    configured = make_settings(index_dir=tmp_path / "x", bundle_roots=f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert configured.reload_roots() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


@pytest.mark.anyio
async def test_reload_reads_bundles_only_from_configured_folders(
    fake_bundle: FakeBundle, tmp_path: Path
) -> None:
    allowed = tmp_path / "bundles"
    (allowed / "next").mkdir(parents=True)
    settings = make_settings(admin_api_key="admin-secret", bundle_roots=str(allowed))
    admin = {"X-API-Key": "admin-secret"}
    async with serve_asgi(create_app(settings, loader=fake_loader(fake_bundle))) as client:
        for outside in ("/etc", str(allowed / ".." / "elsewhere"), str(allowed) + "-sibling"):
            response = await client.post("/admin/reload", json={"index": outside}, headers=admin)
            assert response.status_code == 403 and response.json()["error"]["code"] == "path_not_allowed"
        # Inside the folder the bundle itself is judged (the fake opener knows no bundles: 422).
        response = await client.post("/admin/reload", json={"index": str(allowed / "next")}, headers=admin)
        assert response.status_code == 422 and response.json()["error"]["code"] == "bad_bundle"
