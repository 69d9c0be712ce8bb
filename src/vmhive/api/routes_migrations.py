"""Live migration: `POST /api/vms/NAME/migrate` (relayed to the owning node like
every VM request), and the internal API a source node drives the target with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from vmhive.api.deps import daemon_of, job_response
from vmhive.hypervisor.qemu.migration import MigrationSettings
from vmhive.services.errors import InvalidRequest
from vmhive.services.users import Login

router = APIRouter(tags=["migration"])


class MigrateIn(BaseModel):
    to: str = Field(description="the node to move the running VM to")
    downtime_limit_ms: int = Field(100, description="the longest pause the switchover may take")
    bandwidth: int | None = Field(None, description="bytes/s for RAM and disks; none: no cap")
    auto_converge: bool = Field(
        True, description="slow the guest's vCPUs down if it won't converge"
    )
    multifd_channels: int = Field(0, description="parallel RAM streams (0: one)")
    postcopy: bool = Field(False, description="run on the target before all RAM moved, if needed")
    offline: bool = Field(False, description="move a stopped VM whose disks every node sees")


@router.post("/vms/{name}/migrate", status_code=202)
async def migrate(request: Request, name: str, body: MigrateIn, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    try:
        settings = MigrationSettings(
            downtime_limit_ms=body.downtime_limit_ms,
            bandwidth=body.bandwidth,
            auto_converge=body.auto_converge,
            multifd_channels=body.multifd_channels,
            postcopy=body.postcopy,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    job_id = await daemon.migrations.migrate(name, body.to, settings, offline=body.offline)
    return await job_response(daemon, job_id, wait)


def _node_only(request: Request) -> None:
    login: Login | None = request.state.login
    if login is None or login.via != "node":
        raise HTTPException(403, "only other nodes of the cluster may call this")


@router.post("/internal/migrations")
async def prepare(request: Request) -> dict[str, Any]:
    _node_only(request)
    return await daemon_of(request).incoming.prepare(await request.json())


@router.post("/internal/migrations/{migration_id}/commit")
async def commit(request: Request, migration_id: str) -> dict[str, Any]:
    _node_only(request)
    return await daemon_of(request).incoming.commit(migration_id)


@router.post("/internal/migrations/{migration_id}/{op}")
async def operation(request: Request, migration_id: str, op: str) -> dict[str, Any]:
    _node_only(request)
    args = await request.json() if await request.body() else {}
    return await daemon_of(request).incoming.op(migration_id, op, args)


@router.delete("/internal/migrations/{migration_id}", status_code=204)
async def abort(request: Request, migration_id: str) -> Response:
    _node_only(request)
    await daemon_of(request).incoming.abort(migration_id)
    return Response(status_code=204)
