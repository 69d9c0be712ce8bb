"""Metrics: chart series per VM and for the host, and Prometheus' /metrics.

`router` goes under /api; `root_router` serves /metrics at the root, where
Prometheus looks by default.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from vmhive.api.deps import daemon_of
from vmhive.metrics.prometheus import CONTENT_TYPE
from vmhive.metrics.service import RANGE_NAMES, UnknownRange

router = APIRouter(tags=["metrics"])
root_router = APIRouter(tags=["metrics"])

RangeParam = Annotated[str, Query(alias="range", description=f"one of {', '.join(RANGE_NAMES)}")]


@router.get("/vms/{name}/metrics")
async def vm_metrics(request: Request, name: str, range_: RangeParam = "hour") -> dict[str, Any]:
    """Columnar series (one value per timestamp, null for gaps) of one VM."""
    daemon = daemon_of(request)
    vm = await daemon.ctx.load_vm(name)
    try:
        return daemon.metrics.vm_series(vm.uuid, range_)
    except UnknownRange as exc:
        raise HTTPException(400, str(exc)) from None


@router.get("/host/metrics")
async def host_metrics(request: Request, range_: RangeParam = "hour") -> dict[str, Any]:
    """Columnar series of the host, plus its `current` values."""
    try:
        return daemon_of(request).metrics.host_series(range_)
    except UnknownRange as exc:
        raise HTTPException(400, str(exc)) from None


@root_router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """The latest sample in Prometheus text format."""
    return Response(daemon_of(request).metrics.prometheus_text(), media_type=CONTENT_TYPE)
