"""GET /: the demo page (plain HTML, CSS and JavaScript in app/static, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Only these files are served, by name: the path segment is a lookup key, never joined to a path as given.
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def demo_page() -> FileResponse:
    """A page for trying the service: a search box, a photo drop zone and a grid of results."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


@router.get("/static/{name}")
async def demo_asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})
