"""GET /items/{id} and /items/{id}/image: what a frontend needs to show a search result."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import ServiceDep
from app.errors import ApiError
from app.routes.search import image_url
from app.schemas import ErrorResponse, Item

router = APIRouter(
    prefix="/items", tags=["items"], responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
)


@router.get("/{item_id}", response_model=Item)
async def get_item(item_id: str, service: ServiceDep) -> Item:
    """An item's catalogue record: title, description, category and the rest of its metadata."""
    item = service.item(item_id)
    if item is None:
        raise ApiError(404, "item_not_found", f"no item with id {item_id!r}")
    return Item(
        id=item["id"],
        title=item.get("title", ""),
        text=item.get("text", ""),
        category=item.get("category", ""),
        subcategory=item.get("subcategory", ""),
        image_url=image_url(item["id"]),
        metadata=dict(item.get("metadata") or {}),
    )


@router.get(
    "/{item_id}/image",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the product photo"}},
)
async def get_item_image(item_id: str, service: ServiceDep) -> FileResponse:
    """The item's product photo, as stored in the catalogue."""
    # Only a path the bundle recorded for this id is ever served: the id is a lookup key, not a path.
    path = service.image_path(item_id)
    if path is None:
        raise ApiError(404, "image_not_found", f"no image for item {item_id!r}")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
