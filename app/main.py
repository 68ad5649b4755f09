"""The FastAPI app: `create_app(settings)` wires routes, errors, limits and metrics; `lifespan` loads the
model and the bundle once, in the background, so /healthz answers at once and /readyz says when search can.

Run it with `fashionbert serve --model DIR --index BUNDLE`, or from configuration alone:
`FASHIONBERT_MODEL_DIR=... FASHIONBERT_INDEX_DIR=... uvicorn app.main:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.body_limit import BodyLimitMiddleware
from app.errors import install_error_handlers
from app.metrics import Metrics, RequestMetricsMiddleware
from app.retrieval import SearchService, load_service
from app.routes import admin, demo, items, ops, search
from app.settings import Settings

logger = logging.getLogger(__name__)

ServiceLoader = Callable[[Settings, Metrics], SearchService]

# Multipart framing around the uploaded file (boundaries, part headers, option fields).
_MULTIPART_OVERHEAD = 64 * 1024
_UPLOAD_PATHS = frozenset({"/search/image"})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start loading in the background (or, with `exit_on_startup_error`, before serving, so a bad bundle
    fails start-up and the process exits non-zero); on shutdown stop the batcher and the model thread."""
    settings: Settings = app.state.settings
    if app.state.loader is load_service:
        _check_configured(settings)  # fail fast on a missing path rather than serve 503 forever
    if settings.exit_on_startup_error:
        await _load(app)
    loading = asyncio.create_task(_load(app), name="load-service")
    try:
        yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        if app.state.service is not None:
            await app.state.service.close()


async def _load(app: FastAPI) -> None:
    if app.state.service is not None:
        return
    try:
        service = await asyncio.to_thread(app.state.loader, app.state.settings, app.state.metrics)
        await service.start()  # warm-up: one text and one image search through every stage
    except Exception as error:  # keep the process up and say why on /readyz; the log has the traceback
        logger.exception("the search service failed to start")
        app.state.startup_error = f"startup failed: {error}"
        if app.state.settings.exit_on_startup_error:
            raise
        return
    app.state.service = service
    logger.info("ready: model %s, index %s", service.model_info, service.index_info())


def _check_configured(settings: Settings) -> None:
    for name, path in (("model_dir", settings.model_dir), ("index_dir", settings.index_dir)):
        if path is None:
            raise RuntimeError(f"{name} is not configured: pass it or set FASHIONBERT_{name.upper()}")
        if not path.is_dir():
            raise RuntimeError(f"{name} {path} is not a folder")


def create_app(settings: Settings | None = None, loader: ServiceLoader = load_service) -> FastAPI:
    """A new app with its own settings, metrics registry and (once started) search service."""
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="FashionBERT fashion search",
        version="0.1.0",
        summary="Cross-modal product search: text -> photos and photo -> products, re-ranked by FashionBERT.",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.loader = loader
    app.state.service = None
    app.state.startup_error = None

    install_error_handlers(app)
    for router in (search.router, items.router, ops.router, admin.router, demo.router):
        app.include_router(router)

    # Added innermost first: metrics see every response, the body limit runs before any route reads.
    app.add_middleware(
        BodyLimitMiddleware,
        json_limit=settings.max_json_bytes,
        upload_limit=settings.max_upload_bytes + _MULTIPART_OVERHEAD,
        upload_paths=_UPLOAD_PATHS,
        metrics=metrics,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


# For `uvicorn app.main:app`: reads the configuration, loads nothing until the server starts.
app = create_app()
