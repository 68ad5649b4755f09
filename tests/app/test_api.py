"""The HTTP contract over the fake model and bundle: shapes, options, filters, pagination, errors, auth."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from app.metrics import Metrics
from app.retrieval import SearchService
from app.settings import Settings
from tests.app.conftest import fake_loader, make_settings, serve_asgi
from tests.app.fakes import FakeBundle

pytestmark = pytest.mark.anyio


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, save.pop("format", "PNG"), **save)
    return buffer.getvalue()


async def until_ready(client: httpx.AsyncClient, seconds: float = 5.0) -> None:
    """Poll /readyz until it answers 200 (the caller asserts what ready means)."""
    for _ in range(int(seconds / 0.01)):
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.01)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body


# -- search -------------------------------------------------------------------------------------------


async def test_text_search_finds_item_by_its_own_text(
    client: httpx.AsyncClient, fake_items: list[dict]
) -> None:
    target = fake_items[7]
    response = await client.post("/search/text", json={"query": target["text"], "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["id"] == target["id"]
    first = body["results"][0]
    assert first["image_url"] == f"/items/{target['id']}/image"
    assert first["rank"] == 1 and first["score"] == first["rerank_score"]
    assert set(body["timings"]) == {"encode", "recall", "rerank"}
    assert body["model"]["fingerprint"] and body["index"]["items"] == len(fake_items)
    assert body["took_ms"] >= body["timings"]["rerank"]


async def test_rerank_orders_the_reranked_candidates_and_keeps_recall_order_after(
    client: httpx.AsyncClient,
) -> None:
    body = (
        await client.post("/search/text", json={"query": "red shoes", "k": 20, "recall_k": 20, "rerank_k": 5})
    ).json()
    results = body["results"]
    reranked = [r["rerank_score"] for r in results[:5]]
    assert None not in reranked and reranked == sorted(reranked, reverse=True)
    rest = results[5:]
    assert all(r["rerank_score"] is None for r in rest)
    assert [r["recall_score"] for r in rest] == sorted((r["recall_score"] for r in rest), reverse=True)


async def test_embeddings_only_search_skips_the_cross_encoder(client: httpx.AsyncClient) -> None:
    body = (await client.post("/search/text", json={"query": "blue", "rerank": False, "k": 4})).json()
    assert all(r["rerank_score"] is None and r["score"] == r["recall_score"] for r in body["results"])


async def test_pagination_walks_one_ranking(client: httpx.AsyncClient) -> None:
    query = {"query": "green garment", "recall_k": 30, "rerank_k": 30}
    whole = (await client.post("/search/text", json={**query, "k": 30})).json()["results"]
    pages = []
    for offset in range(0, 30, 7):
        page = (await client.post("/search/text", json={**query, "k": 7, "offset": offset})).json()
        assert page["offset"] == offset and page["total"] == 30
        pages += page["results"]
    assert [r["id"] for r in pages] == [r["id"] for r in whole]
    assert [r["rank"] for r in pages] == list(range(1, 31))
    past = (await client.post("/search/text", json={**query, "offset": 40})).json()
    assert past["results"] == []


async def test_filters_keep_only_matching_items(client: httpx.AsyncClient) -> None:
    body = (
        await client.post(
            "/search/text", json={"query": "red", "k": 50, "recall_k": 6, "filters": {"category": "Shoes"}}
        )
    ).json()
    assert len(body["results"]) == 6  # over-fetched until recall_k matching candidates were found
    assert {r["category"] for r in body["results"]} == {"Shoes"}
    both = {"category": "Shoes", "subcategory": "type2"}
    body = (await client.post("/search/text", json={"query": "red", "k": 50, "filters": both})).json()
    assert body["results"] and all(
        (r["category"], r["subcategory"]) == ("Shoes", "type2") for r in body["results"]
    )
    by_colour = {"metadata.colour": "green", "category": "Shoes"}
    body = (await client.post("/search/text", json={"query": "red", "k": 50, "filters": by_colour})).json()
    assert body["results"] and all(r["category"] == "Shoes" for r in body["results"])
    assert all(r["title"].startswith("green") for r in body["results"])
    nothing = {"category": "Hats"}
    body = (await client.post("/search/text", json={"query": "red", "filters": nothing})).json()
    assert body["results"] == [] and body["total"] == 0


async def test_image_search_takes_options_from_form_or_query(client: httpx.AsyncClient) -> None:
    files = {"file": ("q.png", png(), "image/png")}
    response = await client.post("/search/image?k=3&rerank=false", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
    assert all(r["rerank_score"] is None for r in response.json()["results"])
    # A form field wins over the same query parameter.
    response = await client.post("/search/image?k=3", files=files, data={"k": "5", "rerank_k": "2"})
    results = response.json()["results"]
    assert len(results) == 5 and [r["rerank_score"] is not None for r in results] == [True] * 2 + [False] * 3
    filters = '{"category": "Shoes"}'
    response = await client.post("/search/image", files=files, data={"filters": filters, "k": "20"})
    assert {r["category"] for r in response.json()["results"]} == {"Shoes"}


async def test_image_search_accepts_unusual_modes(client: httpx.AsyncClient) -> None:
    uploads = {
        "cmyk.jpg": png(mode="CMYK", format="JPEG"),
        "palette.png": png(mode="P"),
        "alpha.png": png(mode="RGBA"),
        "gray16.png": png(mode="I;16"),
        "anim.gif": png(mode="P", format="GIF", save_all=True, append_images=[Image.new("P", (16, 16), 3)]),
    }
    for name, data in uploads.items():
        response = await client.post("/search/image", files={"file": (name, data)})
        assert response.status_code == 200, (name, response.text)


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": ""}, 422, "empty_query"),
        ({"query": "   \n\t"}, 422, "empty_query"),
        ({"query": "x" * 2001}, 422, "query_too_long"),
        ({"query": "x", "k": 0}, 422, "invalid_request"),
        ({"query": "x", "k": 101}, 422, "out_of_range"),
        ({"query": "x", "recall_k": 5000}, 422, "out_of_range"),
        ({"query": "x", "rerank_k": -1}, 422, "invalid_request"),
        ({"query": "x", "rerank_k": 501}, 422, "out_of_range"),
        ({"query": "x", "offset": -1}, 422, "invalid_request"),
        ({"query": "x", "offset": 1001}, 422, "out_of_range"),
        ({"query": "x", "k": "many"}, 422, "invalid_request"),
        ({"query": "x", "filters": {"colour": "red"}}, 422, "unknown_filter"),
        ({"query": "x", "filters": {"metadata.": "red"}}, 422, "unknown_filter"),
        ({"query": "x", "filters": {"metadata.a'b": "red"}}, 422, "unknown_filter"),
        ({"query": "x", "filters": ["Shoes"]}, 422, "invalid_request"),
        ({"query": "x", "colour": "red"}, 422, "invalid_request"),
        ({"query": 5}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ([1, 2], 422, "invalid_request"),
    ],
)
async def test_bad_text_search_requests(client: httpx.AsyncClient, body: Any, status: int, code: str) -> None:
    assert_error(await client.post("/search/text", json=body), status, code)


async def test_long_query_below_the_cap_is_truncated_not_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/search/text", json={"query": "red " * 400})
    assert response.status_code == 200, response.text


async def test_malformed_json_and_wrong_content_type(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    assert_error(
        await client.post("/search/text", content=b'{"query": ', headers=headers), 400, "malformed_json"
    )
    assert_error(await client.post("/search/text", content=b"query=red"), 415, "unsupported_media_type")
    assert_error(
        await client.post("/search/text", data={"query": "red"}), 415, "unsupported_media_type"
    )  # a form post
    assert_error(await client.post("/search/image", json={"file": "x"}), 415, "unsupported_media_type")


async def test_bad_uploads(client: httpx.AsyncClient) -> None:
    def upload(content: bytes, **extra: Any) -> Any:
        return client.post("/search/image", files={"file": ("q.jpg", content)}, **extra)

    assert_error(await client.post("/search/image", data={"k": "3"}, files={"other": ("x", b"1")}), 422)
    assert_error(await upload(b""), 422, "empty_file")
    assert_error(await upload(b"%PDF-1.4 not an image"), 415, "not_an_image")
    jpeg = png((64, 64), format="JPEG")
    assert_error(await upload(jpeg[: len(jpeg) // 2]), 422, "corrupt_image")
    assert_error(await upload(png((10000, 10000), mode="1")), 413, "image_too_large")  # 100 Mpx in a few KB
    assert_error(await upload(png(), data={"k": "0"}), 422, "invalid_request")
    assert_error(await upload(png(), data={"filters": "{bad json"}), 422, "invalid_request")
    assert_error(await upload(png(), data={"filters": '{"colour": "red"}'}), 422, "unknown_filter")
    assert_error(await upload(png(), data={"shape": "round"}), 422, "invalid_request")
    assert_error(
        await client.post("/search/image", files={"file": ("q.png", png())}, params={"bogus": "1"}),
        422,
        "invalid_request",
    )


async def test_upload_limits_in_bytes_and_pixels(fake_bundle: FakeBundle) -> None:
    settings = make_settings(max_upload_bytes=2000, max_image_pixels=100 * 100)
    app = create_app(settings, loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        noisy = Image.frombytes(
            "L", (60, 60), np.random.default_rng(0).integers(0, 256, 3600, np.uint8).tobytes()
        )
        buffer = io.BytesIO()
        noisy.save(buffer, "PNG")
        big_file = buffer.getvalue()
        assert len(big_file) > 2000  # 3600 random pixels do not compress
        response = await client.post("/search/image", files={"file": ("q.png", big_file)})
        assert_error(response, 413, "image_too_large")
        assert_error(await client.post("/search/image", files={"file": ("q.png", png((101, 100)))}), 413)
        assert (
            await client.post("/search/image", files={"file": ("q.png", png((100, 100)))})
        ).status_code == 200

        # A body far over the limit is refused from its Content-Length, before it is read...
        huge = b"\0" * 200_000
        assert_error(
            await client.post("/search/image", files={"file": ("q.png", huge)}), 413, "payload_too_large"
        )

        # ...and a streamed body with no Content-Length is cut off once it passes the limit.
        async def stream() -> Any:
            yield b'--abc\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n\r\n'
            for _ in range(100):
                yield b"x" * 10_000

        response = await client.post(
            "/search/image", content=stream(), headers={"content-type": "multipart/form-data; boundary=abc"}
        )
        assert_error(response, 413, "payload_too_large")
        assert (await client.get("/readyz")).status_code == 200


async def test_json_body_limit(client: httpx.AsyncClient) -> None:
    response = await client.post("/search/text", json={"query": "x" * 100_000})
    assert_error(response, 413, "payload_too_large")


async def test_unknown_routes_and_methods_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/search/text"), 405, "method_not_allowed")


# -- items --------------------------------------------------------------------------------------------


async def test_item_metadata_and_image(client: httpx.AsyncClient, fake_items: list[dict]) -> None:
    item = fake_items[3]
    body = (await client.get(f"/items/{item['id']}")).json()
    assert (
        body["id"] == item["id"]
        and body["title"] == item["title"]
        and body["metadata"] == {"colour": "black"}
    )
    response = await client.get(body["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == Path(item["image"]).read_bytes()


async def test_unknown_items_and_traversal_are_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/items/0000009999"), 404, "item_not_found")
    assert_error(await client.get("/items/0000009999/image"), 404, "image_not_found")
    for path in (
        "/items/..%2F..%2Fetc%2Fpasswd/image",
        "/items/%2Fetc%2Fpasswd/image",
        "/items/../../etc/passwd",
    ):
        response = await client.get(path)
        assert response.status_code == 404 and "root:" not in response.text


async def test_an_image_missing_on_disk_is_404(client: httpx.AsyncClient, fake_items: list[dict]) -> None:
    Path(fake_items[0]["image"]).unlink()
    assert_error(await client.get(f"/items/{fake_items[0]['id']}/image"), 404, "image_not_found")


# -- keys -----------------------------------------------------------------------------------------------


async def test_api_keys(fake_bundle: FakeBundle) -> None:
    settings = make_settings(search_api_key="search-secret", admin_api_key="admin-secret")
    app = create_app(settings, loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        query = {"query": "red"}
        assert_error(await client.post("/search/text", json=query), 401, "missing_api_key")
        bad = {"X-API-Key": "search-secreT"}
        assert_error(await client.post("/search/text", json=query, headers=bad), 403, "invalid_api_key")
        good = {"X-API-Key": "search-secret"}
        assert (await client.post("/search/text", json=query, headers=good)).status_code == 200
        files = {"file": ("q.png", png())}
        assert_error(await client.post("/search/image", files=files), 401)
        assert (await client.post("/search/image", files=files, headers=good)).status_code == 200
        assert_error(await client.post("/admin/reload", headers=good), 403, "invalid_api_key")
        assert_error(await client.post("/admin/reload"), 401, "missing_api_key")
        assert (await client.get("/healthz")).status_code == 200  # probes need no key


async def test_admin_is_off_without_a_key(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/admin/reload", headers={"X-API-Key": ""}), 403, "admin_disabled")


# -- readiness, reload, metrics -----------------------------------------------------------------------


async def test_ready_only_after_load_and_warm_up(fake_bundle: FakeBundle) -> None:
    release = threading.Event()
    load = fake_loader(fake_bundle)

    def slow_load(settings: Settings, metrics: Metrics) -> SearchService:
        assert release.wait(10), "test never released the loader"
        return load(settings, metrics)

    app = create_app(make_settings(), loader=slow_load)
    async with serve_asgi(app, wait_ready=False) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert_error(await client.get("/readyz"), 503, "not_ready")
        assert_error(await client.post("/search/text", json={"query": "red"}), 503, "not_ready")
        assert "fashionbert_ready 0.0" in (await client.get("/metrics")).text
        release.set()
        await until_ready(client)
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["index"]["items"] == fake_bundle.size
        assert "fashionbert_ready 1.0" in (await client.get("/metrics")).text


async def test_failed_start_stays_alive_and_not_ready(fake_bundle: FakeBundle) -> None:
    def broken(settings: Settings, metrics: Metrics) -> SearchService:
        raise ValueError("weights do not fit the config")

    app = create_app(make_settings(), loader=broken)
    async with serve_asgi(app, wait_ready=False) as client:
        for _ in range(100):
            if app.state.startup_error:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/healthz")).status_code == 200
        response = await client.get("/readyz")
        assert_error(response, 503, "not_ready")
        assert "weights do not fit" in response.json()["error"]["message"]


async def test_reload_swaps_good_bundles_and_refuses_bad_ones(
    fake_bundle: FakeBundle, fake_items: list[dict]
) -> None:
    new = FakeBundle(fake_items[:10], version="fake-2")
    settings = make_settings(admin_api_key="admin-secret")
    app = create_app(settings, loader=fake_loader(fake_bundle, {Path("/bundles/new"): new}))
    key = {"X-API-Key": "admin-secret"}
    async with serve_asgi(app) as client:
        before = (await client.get("/readyz")).json()["index"]
        refused = await client.post("/admin/reload", json={"index": "/bundles/broken"}, headers=key)
        assert_error(refused, 422, "bad_bundle")
        assert (await client.get("/readyz")).json()["index"] == before  # the old one still serves

        response = await client.post("/admin/reload", json={"index": "/bundles/new"}, headers=key)
        assert response.status_code == 200, response.text
        assert response.json()["previous"] == before
        after = response.json()["index"]
        assert after["items"] == 10 and after["version"] != before["version"]
        search = (await client.post("/search/text", json={"query": "red", "k": 50})).json()
        assert search["index"] == after and len(search["results"]) == 10

        metrics = (await client.get("/metrics")).text
        assert 'fashionbert_index_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'fashionbert_index_reloads_total{outcome="refused"} 1.0' in metrics
        assert "fashionbert_index_items 10.0" in metrics


async def test_in_flight_search_finishes_on_the_bundle_it_started_with(
    fake_bundle: FakeBundle, fake_items: list[dict]
) -> None:
    new = FakeBundle(fake_items[:10], version="fake-2")
    app = create_app(
        make_settings(admin_api_key="k"), loader=fake_loader(fake_bundle, {Path("/bundles/new"): new})
    )
    async with serve_asgi(app) as client:
        service: SearchService = app.state.service
        entered, proceed = asyncio.Event(), asyncio.Event()
        score = service.batcher.score

        async def paused_score(*args: Any) -> Any:
            entered.set()
            await proceed.wait()
            return await score(*args)

        service.batcher.score = paused_score  # type: ignore[method-assign]
        search = asyncio.create_task(client.post("/search/text", json={"query": "red", "k": 50}))
        await entered.wait()
        service.batcher.score = score  # type: ignore[method-assign]
        reload = await client.post(
            "/admin/reload", json={"index": "/bundles/new"}, headers={"X-API-Key": "k"}
        )
        assert reload.status_code == 200
        proceed.set()
        body = (await search).json()
        assert body["index"]["items"] == 30 and len(body["results"]) == 30


async def test_overload_is_503_with_retry_after(fake_bundle: FakeBundle) -> None:
    app = create_app(make_settings(max_queue_depth=2), loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        service: SearchService = app.state.service
        proceed = asyncio.Event()
        score = service.batcher.score

        async def held_score(*args: Any) -> Any:
            await proceed.wait()
            return await score(*args)

        service.batcher.score = held_score  # type: ignore[method-assign]
        held = [asyncio.create_task(client.post("/search/text", json={"query": "red"})) for _ in range(2)]
        while service._in_flight < 2:
            await asyncio.sleep(0.001)
        response = await client.post("/search/text", json={"query": "red"})
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
        proceed.set()
        assert [(await task).status_code for task in held] == [200, 200]


async def test_hung_model_calls_are_abandoned_and_too_many_make_the_service_unready(
    fake_bundle: FakeBundle,
) -> None:
    settings = make_settings(model_call_timeout_s=0.3, max_abandoned_model_calls=0)
    app = create_app(settings, loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        service: SearchService = app.state.service
        release = threading.Event()
        tokenize = service.inference.tokenize

        def hanging_tokenize(texts: Any) -> Any:
            if any("hang" in text for text in texts):
                release.wait()
            return tokenize(texts)

        service.inference.tokenize = hanging_tokenize  # type: ignore[method-assign]
        hung = await client.post("/search/text", json={"query": "hang here"})
        assert_error(hung, 504, "stage_timeout")
        assert "model call" in hung.json()["error"]["message"]
        # Its thread is still stuck and no spare is allowed: not ready, searches refused, clearly.
        assert_error(await client.get("/readyz"), 503, "not_ready")
        assert_error(await client.post("/search/text", json={"query": "red"}), 503, "not_ready")
        assert "fashionbert_model_calls_abandoned 1.0" in (await client.get("/metrics")).text
        release.set()
        await until_ready(client)
        assert (await client.post("/search/text", json={"query": "red"})).status_code == 200
        assert "fashionbert_model_calls_abandoned 0.0" in (await client.get("/metrics")).text


async def test_metrics_count_requests_stages_batches_and_errors(client: httpx.AsyncClient) -> None:
    await client.post("/search/text", json={"query": "red", "rerank_k": 7})
    await client.post("/search/image", files={"file": ("q.png", png())})
    await client.post("/search/text", json={"query": ""})
    text = (await client.get("/metrics")).text
    assert 'fashionbert_requests_total{endpoint="/search/text",method="POST",status="200"} 1.0' in text
    assert 'fashionbert_requests_total{endpoint="/search/text",method="POST",status="422"} 1.0' in text
    assert 'fashionbert_requests_total{endpoint="/search/image",method="POST",status="200"} 1.0' in text
    for stage in ("encode", "recall", "rerank", "total"):
        assert f'fashionbert_stage_seconds_count{{search="text",stage="{stage}"}} 1.0' in text
        assert f'fashionbert_stage_seconds_count{{search="image",stage="{stage}"}} 1.0' in text
    assert 'fashionbert_errors_total{code="empty_query"} 1.0' in text
    assert "fashionbert_rerank_batch_pairs_count" in text and "fashionbert_queue_depth 0.0" in text
    assert 'fashionbert_index_info{items="30",version="' in text
    assert "fashionbert_model_info{" in text
    before = text
    await client.post("/search/text", json={"query": "blue"})
    after = (await client.get("/metrics")).text
    assert 'fashionbert_requests_total{endpoint="/search/text",method="POST",status="200"} 2.0' in after
    assert before != after


async def test_openapi_documents_the_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in (
        "/search/text",
        "/search/image",
        "/items/{item_id}",
        "/items/{item_id}/image",
        "/admin/reload",
    ):
        assert path in spec["paths"], path
    assert "cross-encoder" in spec["paths"]["/search/text"]["post"]["description"]
    assert list(spec["paths"]["/search/image"]["post"]["requestBody"]["content"]) == ["multipart/form-data"]
    assert (await client.get("/docs")).status_code == 200


async def test_cors_origins(fake_bundle: FakeBundle) -> None:
    app = create_app(make_settings(cors_origins=["https://shop.example"]), loader=fake_loader(fake_bundle))
    async with serve_asgi(app) as client:
        response = await client.options(
            "/search/text",
            headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"},
        )
        assert response.headers["access-control-allow-origin"] == "https://shop.example"
