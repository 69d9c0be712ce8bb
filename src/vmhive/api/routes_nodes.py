"""Nodes of the cluster and placement."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from vmhive.api.deps import daemon_of, job_response
from vmhive.api.forward import forward_json
from vmhive.services.placement import Demand

router = APIRouter(tags=["nodes"])


class PlacementIn(BaseModel):
    vcpus: int = Field(1, ge=1)
    memory_mib: int = Field(512, ge=1)
    storage_bytes: int = Field(0, ge=0)
    affinity_group: str | None = None
    networks: list[str] = []
    pools: list[str] = []
    strategy: str = "spread"


@router.get("/nodes")
async def list_nodes(request: Request) -> list[dict[str, Any]]:
    daemon = daemon_of(request)
    return [
        view.as_dict() | {"self": view.name == daemon.nodes.name}
        for view in await daemon.nodes.list()
    ]


@router.get("/nodes/{name}")
async def show_node(request: Request, name: str) -> dict[str, Any]:
    daemon = daemon_of(request)
    view = await daemon.nodes.get(name)
    return view.as_dict() | {"self": view.name == daemon.nodes.name}


@router.post("/nodes/{name}/drain", status_code=202)
async def drain(request: Request, name: str, wait: bool = False) -> JSONResponse:
    """A job on that node: no new VMs there, its running VMs live-migrated away."""
    daemon = daemon_of(request)
    if name != daemon.nodes.name:
        view = await daemon.nodes.get(name)
        if view.online:
            params = {"wait": "true"} if wait else None
            path = f"/api/nodes/{name}/drain"
            return await forward_json(
                daemon, view.reach, "POST", path, request.state.login, None, params
            )
        # An offline node runs nothing to move: marking it is all there is to do.
        await daemon.nodes.set_drained(name, True)
        return JSONResponse(view.as_dict() | {"drained": True}, status_code=200)
    return await job_response(daemon, await daemon.migrations.drain(), wait)


@router.post("/nodes/{name}/undrain")
async def undrain(request: Request, name: str) -> dict[str, Any]:
    return (await daemon_of(request).nodes.set_drained(name, False)).as_dict()


@router.delete("/nodes/{name}", status_code=204)
async def remove(request: Request, name: str) -> Response:
    await daemon_of(request).nodes.remove(name)
    return Response(status_code=204)


@router.post("/placement")
async def placement(request: Request, body: PlacementIn) -> dict[str, Any]:
    """Where a VM with these needs would go, and why each node was or was not chosen."""
    demand = Demand(
        vcpus=body.vcpus,
        memory_mib=body.memory_mib,
        storage_bytes=body.storage_bytes,
        affinity_group=body.affinity_group,
        networks=tuple(body.networks),
        pools=tuple(body.pools),
    )
    verdict = await daemon_of(request).nodes.place(demand, body.strategy)
    return {
        "node": verdict.node,
        "strategy": verdict.strategy,
        "explanation": verdict.explain(),
        "considered": [c.__dict__ for c in verdict.considered],
    }
