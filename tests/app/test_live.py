"""The real app over a real socket: tiny random FashionBERT, real patch network, a bundle of real H&M items.

With a random model the ranking means nothing, so the checks are against a reference instead: the
scores the service reports for an item must be the ones the model gives when called directly.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model.precision import native_bf16
from tests.app.conftest import ready_client

REPO = Path(__file__).resolve().parents[2]
ADMIN = {"X-API-Key": "admin-key"}
SLICE = 48


@pytest.fixture(scope="module")
def catalogue(hm_slice: Any) -> Any:
    """The first SLICE items of the session's H&M slice (real photos, real patch features)."""
    items, _ = hm_slice
    return items.subset(items.items[:SLICE])


@pytest.fixture(scope="module")
def bundles(
    hm_slice: Any, build_slice_bundle: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The serving bundle (SLICE items), a smaller one to reload into, and bundles that must be refused."""
    items, _ = hm_slice
    root = tmp_path_factory.mktemp("bundles")
    for name, count in (("main", SLICE), ("small", 16)):
        build_slice_bundle(items.items[:count], root / name)

    broken = root / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    other_model = root / "other-model"
    shutil.copytree(root / "small", other_model)
    manifest = json.loads((other_model / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64
    (other_model / "manifest.json").write_text(json.dumps(manifest))
    return {"main": root / "main", "small": root / "small", "broken": broken, "other-model": other_model}


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path, bundles: dict[str, Path]) -> Any:
    settings = Settings(
        _env_file=None,
        model_dir=tiny_checkpoint,
        index_dir=bundles["main"],
        device="cpu",
        admin_api_key="admin-key",
        batch_window_ms=20.0,  # wide, so the concurrency test's requests reliably share batches
    )
    app = create_app(settings)
    with ready_client(app) as client:
        yield client, app


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Any:
    """The model called directly, outside the service."""
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    inference = FashionBertInference.from_checkpoint(tiny_checkpoint, device="cpu")
    extractor = PatchFeatureExtractor(PatchFeatureConfig.from_dict(inference.config.patch_features))
    return inference, extractor


def everything(size: int, **extra: Any) -> dict[str, Any]:
    return {"k": size, "recall_k": size, "rerank_k": size, **extra}


def test_ready_and_described(live: Any, catalogue: Any) -> None:
    client, _ = live
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["index"]["items"] == len(catalogue)
    assert ready["model"]["device"] == "cpu"
    # what this CPU computes natively (an AVX2-only one runs fp32), said where operators look
    precision = "bf16" if native_bf16("cpu") else "fp32"
    assert ready["model"]["precision"] == precision
    metrics = client.get("/metrics").text
    assert "fashionbert_ready 1.0" in metrics and f'precision="{precision}"' in metrics


def test_text_search_scores_match_the_model(
    live: Any, catalogue: Any, reference: Any, hm_slice: Any, bundles: dict[str, Path]
) -> None:
    from index.bundle import Bundle

    client, _ = live
    inference, _ = reference
    item = catalogue.items[5]
    size = len(catalogue)
    body = client.post("/search/text", json={"query": item.text, **everything(size)}).json()
    ids = [r["id"] for r in body["results"]]
    assert item.id in ids and len(ids) == size  # recall_k covers the slice: the item must be there
    hit = body["results"][ids.index(item.id)]

    # Recall compares with the image embedding of the exact features; re-ranking reads the bundle's
    # compressed patches, so the reference does too.
    exact = hm_slice[1][5:6].astype(np.float32)  # (1, N, D)
    with Bundle.open(bundles["main"]) as bundle:
        stored = bundle.patch_features([bundle.row_of(item.id)])
    expected_recall = float((inference.encode_texts([item.text]) @ inference.encode_images(exact).T)[0, 0])
    expected_rerank = float(inference.match(inference.tokenize([item.text]), stored)[0])
    assert hit["recall_score"] == pytest.approx(expected_recall, abs=0.02)
    assert hit["rerank_score"] == pytest.approx(expected_rerank, abs=0.05)
    scores = [r["rerank_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_image_search_scores_match_the_model(live: Any, catalogue: Any, reference: Any) -> None:
    client, _ = live
    inference, extractor = reference
    item = catalogue.items[9]
    size = len(catalogue)
    image = Path(item.image).read_bytes()
    response = client.post(
        "/search/image", files={"file": ("q.jpg", image, "image/jpeg")}, data=everything(size)
    )
    assert response.status_code == 200, response.text
    ids = [r["id"] for r in response.json()["results"]]
    assert item.id in ids
    hit = response.json()["results"][ids.index(item.id)]

    features = extractor.extract([Image.open(io.BytesIO(image))])
    expected_recall = float((inference.encode_images(features) @ inference.encode_texts([item.text]).T)[0, 0])
    expected_rerank = float(inference.match(inference.tokenize([item.text]), features)[0])
    assert hit["recall_score"] == pytest.approx(expected_recall, abs=0.02)
    assert hit["rerank_score"] == pytest.approx(expected_rerank, abs=0.05)


def test_embeddings_only_ranks_by_recall_similarity(live: Any, catalogue: Any) -> None:
    client, _ = live
    body = client.post("/search/text", json={"query": "black dress", "rerank": False, "k": 20}).json()
    scores = [r["recall_score"] for r in body["results"]]
    assert len(scores) == 20 and scores == sorted(scores, reverse=True)
    assert all(r["rerank_score"] is None for r in body["results"])


def test_filters_and_pagination(live: Any, catalogue: Any) -> None:
    client, _ = live
    category = catalogue.items[0].category
    expected = {item.id for item in catalogue.items if item.category == category}
    size = len(catalogue)
    body = client.post(
        "/search/text", json={"query": "cotton", **everything(size), "filters": {"category": category}}
    ).json()
    assert {r["id"] for r in body["results"]} == expected

    query = {"query": "soft jersey top", "recall_k": 30, "rerank_k": 30}
    whole = [r["id"] for r in client.post("/search/text", json={**query, "k": 30}).json()["results"]]
    pages = []
    for offset in (0, 10, 20):
        page = client.post("/search/text", json={**query, "k": 10, "offset": offset}).json()
        pages += [r["id"] for r in page["results"]]
    assert pages == whole


def test_items_and_their_images(live: Any, catalogue: Any) -> None:
    client, _ = live
    item = catalogue.items[3]
    body = client.get(f"/items/{item.id}").json()
    assert (body["title"], body["category"], body["subcategory"]) == (
        item.title,
        item.category,
        item.subcategory,
    )
    image = client.get(body["image_url"])
    assert image.status_code == 200 and image.content == Path(item.image).read_bytes()
    assert image.headers["content-type"] == "image/jpeg"
    assert client.get("/items/9999999999").status_code == 404
    assert client.get("/items/..%2F..%2F..%2Fetc%2Fpasswd/image").status_code == 404


def test_bad_input_over_the_socket_leaves_the_service_healthy(live: Any) -> None:
    client, _ = live
    responses = [
        client.post("/search/text", content=b'{"query": "x"', headers={"content-type": "application/json"}),
        client.post("/search/text", json={"query": " "}),
        client.post("/search/text", json={"query": "x", "k": 10_000}),
        client.post("/search/image", files={"file": ("q.jpg", b"\xff\xd8\xff\xe0 truncated")}),
        client.post("/search/image", files={"file": ("q.txt", b"hello")}),
        client.post("/search/image", data={"k": "3"}),
        client.post("/admin/reload", headers={"X-API-Key": "wrong"}),
    ]
    statuses = [r.status_code for r in responses]
    assert statuses == [400, 422, 422, 422, 415, 415, 403], statuses
    assert all("error" in r.json() for r in responses)
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    response = client.post("/search/image", files={"file": ("bomb.png", bomb.getvalue())})
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"
    assert client.get("/readyz").status_code == 200
    assert client.post("/search/text", json={"query": "red"}).status_code == 200


def test_concurrent_searches_share_rerank_batches(live: Any, catalogue: Any) -> None:
    """Text and image queries re-rank together: their pairs carry the same (pooled) patch grid."""
    client, _ = live
    photo = Path(catalogue.items[3].image).read_bytes()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as ac:
            texts = [
                ac.post("/search/text", json={"query": f"striped shirt {i}", "rerank_k": 10})
                for i in range(8)
            ]
            images = [
                ac.post(
                    "/search/image", files={"file": ("q.jpg", photo, "image/jpeg")}, data={"rerank_k": "10"}
                )
                for _ in range(4)
            ]
            responses = await asyncio.gather(*texts, *images)
        return [r.status_code for r in responses]

    before = _metric(client, "fashionbert_rerank_batch_requests_count")
    pairs_before = _metric(client, "fashionbert_rerank_pairs_total")
    assert asyncio.run(burst()) == [200] * 12
    batches = _metric(client, "fashionbert_rerank_batch_requests_count") - before
    assert 1 <= batches < 12  # twelve requests' pairs went through fewer model calls
    assert _metric(client, "fashionbert_rerank_pairs_total") - pairs_before == 120


def test_reload_refuses_bad_bundles_and_swaps_good_ones(live: Any, bundles: dict[str, Path]) -> None:
    client, _ = live
    before = client.get("/readyz").json()["index"]
    for bad in (bundles["broken"], bundles["other-model"], bundles["main"].parent / "missing"):
        response = client.post("/admin/reload", json={"index": str(bad)}, headers=ADMIN)
        assert response.status_code == 422 and response.json()["error"]["code"] == "bad_bundle"
        assert client.get("/readyz").json()["index"] == before
    response = client.post("/admin/reload", json={"index": str(bundles["small"])}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["index"]["items"] == 16
    assert client.post("/search/text", json={"query": "red", "k": 50}).json()["index"]["items"] == 16
    response = client.post("/admin/reload", json={"index": str(bundles["main"])}, headers=ADMIN)
    assert response.json()["index"] == before
    metrics = client.get("/metrics").text
    assert 'fashionbert_index_reloads_total{outcome="refused"} 3.0' in metrics


def test_metrics_move(live: Any) -> None:
    client, _ = live
    before = _metric(client, 'fashionbert_stage_seconds_count{search="text",stage="rerank"}')
    client.post("/search/text", json={"query": "denim"})
    after = _metric(client, 'fashionbert_stage_seconds_count{search="text",stage="rerank"}')
    assert after == before + 1
    text = client.get("/metrics").text
    for name in (
        "fashionbert_requests_total",
        "fashionbert_rerank_batch_pairs_bucket",
        "fashionbert_queue_depth",
    ):
        assert name in text
    assert np.isfinite(_metric(client, "fashionbert_index_items"))


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_fashionbert_serve_command(tiny_checkpoint: Path, bundles: dict[str, Path], catalogue: Any) -> None:
    """`fashionbert serve --model --index` in its own process, as an operator starts it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(tiny_checkpoint)]
    command += ["--index", str(bundles["main"]), "--port", str(port), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONBERT_")}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                assert time.monotonic() < deadline, "the server did not become ready"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            body = client.post("/search/text", json={"query": catalogue.items[0].text}).json()
            assert len(body["results"]) == 10 and body["index"]["items"] == len(catalogue)
    finally:
        process.terminate()
        process.wait(timeout=30)
