"""One error shape for every failure: `{"error": {"code", "message"}}`, whatever raised it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

# Codes for plain HTTP errors raised by the framework itself (unknown route, wrong method, ...).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error the client should see as is. An HTTPException, so FastAPI re-raises it from body parsing."""

    def __init__(
        self, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers) if headers else None)
        self.code = code
        self.message = message


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(
    request: Request | None,
    status_code: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON error response, counted in the app's `errors` metric when there is an app to count in."""
    metrics = getattr(request.app.state, "metrics", None) if request is not None else None
    if metrics is not None:
        metrics.errors.labels(code=code).inc()
    return JSONResponse(
        error_body(code, message, details),
        status_code=status_code,
        headers=dict(headers) if headers else None,
    )


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.code, exc.message, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # FastAPI reports an unparseable body as json_invalid at ("body", <character offset>).
    if any(error.get("type") == "json_invalid" and _is_body_offset(error.get("loc", ())) for error in errors):
        return error_response(request, 400, "malformed_json", "the request body is not valid JSON")
    details = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in errors
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(request, 422, "invalid_request", message, details=jsonable_encoder(details))


def _is_body_offset(loc: Any) -> bool:
    return len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "internal_error", "the server failed to handle this request")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error type through `error_response` so clients see one shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
