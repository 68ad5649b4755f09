"""POST /admin/reload: swap in a new index bundle without dropping a request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from app.deps import ServiceDep, SettingsDep, require_admin_key
from app.errors import ApiError
from app.schemas import ErrorResponse, IndexInfo, ReloadRequest, ReloadResponse

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key)],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 403, 409, 422, 503)},
)


@router.post("/reload", response_model=ReloadResponse)
async def reload_index(
    service: ServiceDep, settings: SettingsDep, body: Annotated[ReloadRequest | None, Body()] = None
) -> ReloadResponse:
    """Load a bundle (the given folder, or the current one re-read) and swap it in once it has answered a
    text and an image search. Searches keep being served meanwhile and those in flight finish on the old
    bundle. A bundle that fails to open, was built for another model or fails its warm-up is refused
    (422) and the old one keeps serving; a folder outside the configured bundle folders is refused (403).
    Needs the admin API key.
    """
    start = time.perf_counter()
    path = Path(body.index) if body is not None and body.index else None
    roots = settings.reload_roots()
    if path is not None and roots and not any(path.resolve().is_relative_to(root) for root in roots):
        raise ApiError(
            403, "path_not_allowed", "bundles are only read from the configured bundle folders (bundle_roots)"
        )
    previous, current = await service.reload(path)
    return ReloadResponse(
        previous=IndexInfo(**previous),
        index=IndexInfo(**current),
        took_ms=1000 * (time.perf_counter() - start),
    )
