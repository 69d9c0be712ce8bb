"""Host information."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from vmhive.api.deps import daemon_of

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
