"""Virtual switches, VM NICs, port forwards and host clean-up."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vmhive.api.deps import daemon_of, job_response
from vmhive.services.networks import NetworkRequest

router = APIRouter(tags=["networks"])


class NetworkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    type: str = Field("nat", description="nat, internal, private or external")
    subnet: str | None = Field(None, description="e.g. 10.10.0.0/24; default: a free /24")
    gateway: str | None = None
    dhcp_start: str | None = None
    dhcp_end: str | None = None
    uplink: str | None = Field(None, description="external: the host NIC to bridge onto")
    bridge: str | None = Field(None, description="external: an existing host bridge")
    domain: str | None = None


class NicIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    network: str
    mac: str | None = None
    model: str | None = Field(None, description="virtio or e1000 (default by generation)")
    ip: str | None = Field(None, description="a fixed address (DHCP reservation)")


class LinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    up: bool


class ForwardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host_port: int
    vm: str
    vm_port: int
    proto: str = "tcp"
    nic: int | None = None


@router.get("/networks")
async def list_networks(request: Request) -> list[dict[str, Any]]:
    networks = daemon_of(request).networks
    return [
        {**networks.describe(row), "nics": count} for row, count in await networks.list_networks()
    ]


@router.post("/networks", status_code=202)
async def create_network(request: Request, body: NetworkIn, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.networks.create(NetworkRequest(**body.model_dump()))
    return await job_response(daemon, job, wait)


@router.get("/networks/{name}")
async def show_network(request: Request, name: str) -> dict[str, Any]:
    return await daemon_of(request).networks.show(name)


@router.delete("/networks/{name}", status_code=202)
async def delete_network(request: Request, name: str, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.networks.delete(name), wait)


@router.get("/networks/{name}/forwards")
async def list_forwards(request: Request, name: str) -> list[dict[str, Any]]:
    return await daemon_of(request).networks.list_forwards(name)


@router.post("/networks/{name}/forwards", status_code=201)
async def add_forward(request: Request, name: str, body: ForwardIn) -> dict[str, Any]:
    return await daemon_of(request).networks.add_forward(
        name,
        host_port=body.host_port,
        vm_name=body.vm,
        vm_port=body.vm_port,
        proto=body.proto,
        nic=body.nic,
    )


@router.delete("/networks/{name}/forwards/{proto}/{host_port}")
async def remove_forward(request: Request, name: str, proto: str, host_port: int) -> dict[str, str]:
    await daemon_of(request).networks.remove_forward(name, host_port, proto)
    return {"removed": f"{proto}/{host_port}"}


@router.post("/vms/{vm}/nics", status_code=202)
async def add_nic(request: Request, vm: str, body: NicIn, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.networks.add_nic(
        vm, body.network, mac=body.mac, model=body.model, ip=body.ip
    )
    return await job_response(daemon, job, wait)


@router.delete("/vms/{vm}/nics/{index}", status_code=202)
async def remove_nic(request: Request, vm: str, index: int, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.networks.remove_nic(vm, index), wait)


@router.post("/vms/{vm}/nics/{index}/link", status_code=202)
async def set_link(
    request: Request, vm: str, index: int, body: LinkIn, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.networks.set_link(vm, index, body.up), wait)


@router.post("/host/cleanup")
async def host_cleanup(request: Request, dry_run: bool = True) -> dict[str, list[str]]:
    """Everything vmhive-named on the host that nothing owns; removed unless dry_run."""
    return await daemon_of(request).networks.cleanup(dry_run)
