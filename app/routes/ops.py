"""Liveness, readiness and Prometheus metrics: what an orchestrator and a scraper poll."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import MetricsDep, get_service
from app.metrics import CONTENT_TYPE
from app.schemas import ErrorResponse, Health, IndexInfo, ModelInfo, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and answering HTTP (it may still be loading: see /readyz)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Readiness:
    """200 once the model and index are loaded and a text and an image search have run; 503 before."""
    service = get_service(request)
    return Readiness(
        status="ready", model=ModelInfo(**service.model_info), index=IndexInfo(**service.index_info())
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format: requests, stage latencies, re-rank batches, queue depth, index and model."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
