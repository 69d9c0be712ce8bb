"""Host information and images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vmhive.api.deps import daemon_of, job_response
from vmhive.api.schemas import ImageOut

router = APIRouter(tags=["host"])


@router.get("/host")
async def host_info(request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    info = daemon.host.as_dict()
    async with daemon.sessions() as session:
        info["vms"] = await daemon.vm_counts(session)
    info["data_dir"] = str(daemon.settings.data_dir)
    info["image_dir"] = str(daemon.settings.images)
    return info


@router.get("/images", response_model=list[ImageOut])
async def list_images(request: Request) -> list[ImageOut]:
    daemon = daemon_of(request)
    return [
        ImageOut(
            name=i.name,
            path=str(i.path),
            format=i.format,
            virtual_size=i.virtual_size,
            actual_size=i.actual_size,
        )
        for i in await daemon.vms.images.list()
    ]


@router.post("/images/tiny", status_code=202)
async def build_tiny(request: Request, wait: bool = False) -> JSONResponse:
    """Build (or refresh) the tiny test guest image from Debian packages."""
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.build_tiny(), wait)
