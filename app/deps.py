"""Route dependencies: settings, the search service, metrics and API-key checks (tests override these)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from app.errors import ApiError
from app.metrics import Metrics
from app.retrieval import SearchService
from app.settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key, when the server requires one"
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_service(request: Request) -> SearchService:
    """The loaded, warmed-up service; 503 while it is still loading (or failed to)."""
    service: SearchService | None = request.app.state.service
    if service is None or not service.ready:
        reason = request.app.state.startup_error or "the model and index are still loading"
        raise ApiError(503, "not_ready", reason, headers={"Retry-After": "5"})
    if service.model_lane.exhausted:
        reason = f"{service.model_lane.abandoned} model calls are stuck; waiting for one to return"
        raise ApiError(503, "not_ready", reason, headers={"Retry-After": "5"})
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServiceDep = Annotated[SearchService, Depends(get_service)]
ApiKeyDep = Annotated[str | None, Security(api_key_header)]


def _check_key(expected: SecretStr, given: str | None) -> None:
    if not given:
        raise ApiError(401, "missing_api_key", "this endpoint needs an X-API-Key header")
    # Constant-time: the comparison takes as long whatever prefix of the key a guess gets right.
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "invalid_api_key", "the API key is not valid for this endpoint")


def require_search_key(settings: SettingsDep, api_key: ApiKeyDep) -> None:
    """Search endpoints are open unless `search_api_key` is configured."""
    if settings.search_api_key is not None:
        _check_key(settings.search_api_key, api_key)


def require_admin_key(settings: SettingsDep, api_key: ApiKeyDep) -> None:
    """Admin endpoints are switched off unless `admin_api_key` is configured."""
    if settings.admin_api_key is None:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: no admin API key is configured")
    _check_key(settings.admin_api_key, api_key)


def require_content_type(*allowed: str):  # noqa: ANN201 - a dependency factory
    """A dependency refusing bodies of other media types with 415 before anything parses them."""

    def check(request: Request) -> None:
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in allowed:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"expected a {' or '.join(allowed)} body, got {media_type or 'no content type'}",
            )

    return check
