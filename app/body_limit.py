"""Request body caps enforced while the body streams in, before anything holds it whole in memory."""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, error_body
from app.metrics import Metrics


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuses a declared Content-Length over the limit at once, and stops a stream when it passes it.

    Upload routes get `upload_limit` (the file plus some multipart framing), everything else `json_limit`.
    """

    def __init__(
        self,
        app: ASGIApp,
        json_limit: int,
        upload_limit: int,
        upload_paths: frozenset[str],
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.json_limit = json_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] in self.upload_paths else self.json_limit
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if self.metrics is not None:
                self.metrics.errors.labels(code="payload_too_large").inc()
            await _send_413(send, limit)
            return

        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # surfaces through the app's exception handlers as a 413
            return message

        await self.app(scope, receive_with_limit, send)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body("payload_too_large", f"request body exceeds the limit of {limit} bytes")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": 413, "headers": headers + [(b"connection", b"close")]}
    )
    await send({"type": "http.response.body", "body": body})
