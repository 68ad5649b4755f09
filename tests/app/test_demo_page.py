"""The demo page at GET /, driven in a real headless Chromium (Debian's) through Playwright.

The app runs the fake model over a bundle of generated garments, so the page shows real pictures.
Skips where Playwright or Chromium is missing; .ci/run installs both.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from model.synthetic import SyntheticConfig, write_catalogue
from tests.app.conftest import fake_loader, live_server, make_settings
from tests.app.fakes import FakeBundle

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip("no Chromium (apt-get install -y chromium; .ci/run does)")
    return path


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    catalogue = write_catalogue(tmp_path_factory.mktemp("demo") / "synthetic", SyntheticConfig(items=24))
    items = []
    for line in catalogue.read_text().splitlines():
        record = json.loads(line)
        items.append({**record, "image": str(catalogue.parent / record["image"]), "metadata": {}})
    return items


@pytest.fixture(scope="module")
def base_url(garments: list[dict[str, Any]]) -> Iterator[str]:
    app = create_app(make_settings(), loader=fake_loader(FakeBundle(garments)))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.05)
        yield url


@pytest.fixture(scope="module")
def page(base_url: str):  # noqa: ANN201 - a Playwright page
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (.ci/run does)")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def test_page_and_assets_are_served(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="query"' in page.text and 'id="drop-zone"' in page.text
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/static/../main.py").status_code == 404
        assert client.get("/static/index.html").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]


def _loaded_images(page) -> int:  # noqa: ANN001
    """Result photos the browser fetched and decoded (naturalWidth > 0), not just <img> tags."""
    return page.eval_on_selector_all(
        "#results .photo", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length"
    )


def _wait_for_images(page) -> None:  # noqa: ANN001
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#results .photo')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )


def test_text_search_shows_result_photos_titles_scores_and_timings(page, base_url: str) -> None:  # noqa: ANN001
    page.goto(base_url + "/")
    page.wait_for_selector("#readiness[data-state='ready']")
    page.fill("#query", "red striped t-shirt")
    page.press("#query", "Enter")
    _wait_for_images(page)
    cards = page.locator("#results .result")
    assert cards.count() == 12 and _loaded_images(page) == 12
    assert "red" in cards.first.locator(".title").inner_text().lower()
    assert "score" in cards.first.locator(".meta").inner_text()
    timings = page.inner_text("#timings")
    assert all(stage in timings for stage in ("encode", "recall", "re-rank", "took"))
    assert not page.is_visible("#error")


def test_photo_upload_and_drop_show_results(page, base_url: str, garments: list[dict[str, Any]]) -> None:  # noqa: ANN001
    page.goto(base_url + "/")
    page.wait_for_selector("#readiness[data-state='ready']")
    photo = Path(garments[5]["image"])

    page.set_input_files("#image-file", str(photo))  # the file chooser
    _wait_for_images(page)
    assert page.locator("#results .result").count() == 12
    assert "your photo" in page.inner_text("#status")
    assert page.is_visible("#query-preview")

    page.evaluate("document.getElementById('results').replaceChildren()")
    page.evaluate(  # drag and drop: a drop event carrying the file, as the browser sends one
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/png'}));
            const zone = document.getElementById('drop-zone');
            zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
        }""",
        [photo.name, base64.b64encode(photo.read_bytes()).decode()],
    )
    _wait_for_images(page)
    assert page.locator("#results .result").count() == 12
    if os.environ.get("DEMO_PAGE_SCREENSHOT"):
        page.screenshot(path=os.environ["DEMO_PAGE_SCREENSHOT"], full_page=True)


def test_errors_are_shown_on_the_page(page, base_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    page.goto(base_url + "/")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is not a picture")
    page.set_input_files("#image-file", str(not_an_image))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error")
