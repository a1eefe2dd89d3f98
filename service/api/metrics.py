"""Prometheus exposition of service/obs/metrics.py."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.obs.metrics import METRICS
from service.route_table import endpoint

router = APIRouter(tags=["health"])


@endpoint(
    router,
    "metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics() -> Response:
    return Response(METRICS.exposition(), media_type=CONTENT_TYPE_LATEST)
