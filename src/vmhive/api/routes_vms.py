"""VMs: create, list, show, edit, delete, power actions (consoles: routes_consoles.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vmhive.api.deps import daemon_of, job_response
from vmhive.api.forward import forward_json
from vmhive.api.schemas import CloudInitIn, VmClone, VmCreate, VmEdit, VmOut
from vmhive.services import listing
from vmhive.services.errors import InvalidRequest, PlacedElsewhere
from vmhive.services.vms import CreateVmRequest, DiskRequest, EditVmRequest
from vmhive.storage.qemu_img import parse_size

router = APIRouter(tags=["vms"])

POWER_ACTIONS = ("start", "stop", "force-stop", "reboot", "reset", "pause", "resume")


def parse_size_field(value: str | int) -> int:
    """A size as JSON gives it: bytes, or text such as "10G"."""
    if isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


@router.get("/vms", response_model=list[VmOut])
async def list_vms(request: Request) -> Response:
    # Written from plain rows, not through VmOut (services/listing.py: a cluster
    # lists 10,000 VMs); `response_model` documents the shape.
    daemon = daemon_of(request)
    async with daemon.sessions() as session:
        body = await listing.list_json(session, daemon.networks.lease_of)
    return Response(body, media_type="application/json")


@router.post("/vms", status_code=202)
async def create_vm(request: Request, body: VmCreate, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    settings = body.cloud_init_settings
    req = CreateVmRequest(
        **body.model_dump(exclude={"disks", "cloud_init_settings"}),
        cloud_init_settings=settings.to_config() if settings else None,
        disks=[
            DiskRequest(
                size=None if d.size is None else parse_size_field(d.size),
                image=d.image,
                mode=d.mode,
            )
            for d in body.disks
        ],
    )
    try:
        job_id = await daemon.vms.create(req)
    except PlacedElsewhere as elsewhere:  # created by the node placement chose
        node = await daemon.nodes.address_of(elsewhere.node)
        daemon.nodes.forget_usage()  # the VM lands there: the next placement must see it
        body_out = body.model_dump(mode="json") | {"node": elsewhere.node}
        params = {"wait": "true"} if wait else None
        return await forward_json(
            daemon, node, "POST", "/api/vms", request.state.login, body_out, params
        )
    return await job_response(daemon, job_id, wait)


@router.get("/vms/{name}", response_model=VmOut)
async def show_vm(request: Request, name: str) -> VmOut:
    daemon = daemon_of(request)
    vm = await daemon.ctx.load_vm(name)
    return VmOut.of(vm, await daemon.networks.addresses(vm), await daemon.nodes.names_by_id())


@router.patch("/vms/{name}", response_model=VmOut)
async def edit_vm(request: Request, name: str, body: VmEdit) -> VmOut:
    daemon = daemon_of(request)
    await daemon.vms.edit(name, EditVmRequest(**body.model_dump()))
    return VmOut.of(await daemon.ctx.load_vm(name), None, await daemon.nodes.names_by_id())


@router.delete("/vms/{name}", status_code=202)
async def delete_vm(
    request: Request, name: str, force: bool = False, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.vms.delete(name, force=force), wait)


@router.post("/vms/{name}/template", status_code=202)
async def make_template(request: Request, name: str, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.templates.make_template(name), wait)


@router.post("/vms/{name}/clone", status_code=202)
async def clone_vm(request: Request, name: str, body: VmClone, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.templates.clone(
        name, body.name, linked=body.linked, start=body.start, snapshot=body.snapshot
    )
    return await job_response(daemon, job, wait)


@router.get("/vms/{name}/cloud-init")
async def show_cloud_init(request: Request, name: str) -> dict[str, Any]:
    """The settings, the instance-id and the seed's files exactly as the guest reads them."""
    return await daemon_of(request).cloudinit.show(name)


@router.put("/vms/{name}/cloud-init", status_code=202)
async def set_cloud_init(
    request: Request, name: str, body: CloudInitIn, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.cloudinit.set(name, body.to_config()), wait)


@router.delete("/vms/{name}/cloud-init", status_code=202)
async def remove_cloud_init(request: Request, name: str, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.cloudinit.disable(name), wait)


@router.post("/vms/{name}/{action}", status_code=202)
async def power_action(
    request: Request, name: str, action: str, wait: bool = False, timeout: float | None = None
) -> JSONResponse:
    daemon = daemon_of(request)
    life = daemon.lifecycle
    if action not in POWER_ACTIONS:
        return JSONResponse(
            {"detail": f"unknown action {action!r}; use one of {', '.join(POWER_ACTIONS)}"}, 404
        )
    if timeout is not None and not 0 <= timeout <= 3600:
        raise InvalidRequest("timeout must be between 0 and 3600 seconds")
    calls = {
        "start": lambda: life.start(name),
        "stop": lambda: life.stop(name, timeout),
        "force-stop": lambda: life.force_stop(name),
        "reboot": lambda: life.reboot(name, timeout),
        "reset": lambda: life.reset(name),
        "pause": lambda: life.pause(name),
        "resume": lambda: life.resume(name),
    }
    return await job_response(daemon, await calls[action](), wait)
