"""Storage: pools, volumes, import, and attaching volumes to VMs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from vmhive.api.deps import daemon_of, job_response
from vmhive.api.routes_vms import parse_size_field
from vmhive.services.pools import PoolView
from vmhive.services.volumes import VolumeView

router = APIRouter(tags=["storage"])


class PoolOut(BaseModel):
    name: str
    type: str
    shared: bool
    path: str  # on the node that answers
    total_bytes: int
    free_bytes: int
    volumes: int  # the volumes this node can use
    usable: bool  # on the node that answers
    problem: str | None  # why not

    @classmethod
    def of(cls, view: PoolView) -> PoolOut:
        capacity = view.capacity
        return cls(
            name=view.name,
            type=view.type,
            shared=view.shared,
            path=str(view.path),
            total_bytes=capacity.total if capacity else 0,
            free_bytes=capacity.free if capacity else 0,
            volumes=view.volumes,
            usable=view.usable,
            problem=view.problem,
        )


class PoolCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    shared: bool = False
    type: str = "dir"


class VolumeOut(BaseModel):
    pool: str
    name: str
    format: str
    path: str
    virtual_size: int
    allocated_size: int
    attached_to: list[str]
    backing: str | None
    node: str | None = None  # the node holding it, in a local pool

    @classmethod
    def of(cls, view: VolumeView) -> VolumeOut:
        v = view.volume
        return cls(
            pool=v.pool.name,
            name=v.name,
            format=v.format,
            path=v.path,
            virtual_size=view.sizes.virtual,
            allocated_size=view.sizes.allocated,
            attached_to=view.attached_to,
            backing=view.backing,
            node=view.node,
        )


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: str | int
    format: str = "qcow2"


class VolumeImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    source: str
    format: str = "auto"


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: str | int


class DiskAttach(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: str = "local"
    volume: str


class IsoOut(BaseModel):
    name: str
    path: str
    size: int
    used_by: list[str]


class IsoImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    name: str | None = None


class CdromInsert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    iso: str


@router.get("/isos", response_model=list[IsoOut])
async def list_isos(request: Request) -> list[IsoOut]:
    return [
        IsoOut(name=i.name, path=str(i.path), size=i.size, used_by=i.used_by)
        for i in await daemon_of(request).media.list()
    ]


@router.post("/isos", status_code=202)
async def import_iso(request: Request, body: IsoImport, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.media.import_file(body.source, body.name), wait)


@router.delete("/isos/{name}")
async def delete_iso(request: Request, name: str) -> dict[str, str]:
    await daemon_of(request).media.delete(name)
    return {"deleted": name}


@router.post("/vms/{vm}/cdroms/{drive}/insert", status_code=202)
async def insert_cdrom(
    request: Request, vm: str, drive: int, body: CdromInsert, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.media.insert(vm, body.iso, drive), wait)


@router.post("/vms/{vm}/cdroms/{drive}/eject", status_code=202)
async def eject_cdrom(request: Request, vm: str, drive: int, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.media.eject(vm, drive), wait)


@router.get("/pools", response_model=list[PoolOut])
async def list_pools(request: Request) -> list[PoolOut]:
    return [PoolOut.of(view) for view in await daemon_of(request).pools.list()]


@router.post("/pools", response_model=PoolOut, status_code=201)
async def create_pool(request: Request, body: PoolCreate) -> PoolOut:
    pools = daemon_of(request).pools
    return PoolOut.of(await pools.create(body.name, body.path, shared=body.shared, type=body.type))


@router.get("/pools/{pool}", response_model=PoolOut)
async def show_pool(request: Request, pool: str) -> PoolOut:
    return PoolOut.of(await daemon_of(request).pools.get(pool))


@router.delete("/pools/{pool}")
async def delete_pool(request: Request, pool: str) -> dict[str, str]:
    await daemon_of(request).pools.delete(pool)
    return {"deleted": pool}


@router.get("/volumes", response_model=list[VolumeOut])
async def list_all_volumes(request: Request, pool: str | None = None) -> list[VolumeOut]:
    return [VolumeOut.of(v) for v in await daemon_of(request).volumes.list(pool)]


@router.post("/pools/{pool}/volumes", status_code=202)
async def create_volume(
    request: Request, pool: str, body: VolumeCreate, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    size = parse_size_field(body.size)
    return await job_response(
        daemon, await daemon.volumes.create(pool, body.name, size, body.format), wait
    )


@router.post("/pools/{pool}/import", status_code=202)
async def import_volume(
    request: Request, pool: str, body: VolumeImport, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.volumes.import_file(pool, body.name, body.source, body.format)
    return await job_response(daemon, job, wait)


@router.get("/pools/{pool}/volumes/{name}", response_model=VolumeOut)
async def show_volume(request: Request, pool: str, name: str) -> VolumeOut:
    return VolumeOut.of(await daemon_of(request).volumes.show(pool, name))


@router.post("/pools/{pool}/volumes/{name}/resize", status_code=202)
async def resize_volume(
    request: Request, pool: str, name: str, body: VolumeResize, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    size = parse_size_field(body.size)
    return await job_response(daemon, await daemon.volumes.resize(pool, name, size), wait)


@router.delete("/pools/{pool}/volumes/{name}", status_code=202)
async def delete_volume(request: Request, pool: str, name: str, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.volumes.delete(pool, name), wait)


@router.post("/vms/{vm}/disks", status_code=202)
async def attach_disk(
    request: Request, vm: str, body: DiskAttach, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.volumes.attach(vm, body.pool, body.volume), wait)


@router.delete("/vms/{vm}/disks/{pool}/{volume}", status_code=202)
async def detach_disk(
    request: Request, vm: str, pool: str, volume: str, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.volumes.detach(vm, pool, volume), wait)
