"""The image store: list, show, build, import, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vmhive.api.deps import daemon_of, job_response
from vmhive.api.schemas import ImageImport, ImageOut

router = APIRouter(tags=["images"])


@router.get("/images", response_model=list[ImageOut])
async def list_images(request: Request) -> list[ImageOut]:
    return [ImageOut.of(i) for i in await daemon_of(request).images.list_images()]


@router.post("/images", status_code=202)
async def import_image(request: Request, body: ImageImport, wait: bool = False) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.images.import_image(body.source, body.name, body.format)
    return await job_response(daemon, job, wait)


@router.post("/images/build/{recipe}", status_code=202)
async def build_image(request: Request, recipe: str, wait: bool = False) -> JSONResponse:
    """Build (or refresh) the tiny test image or the Debian 12 cloud image."""
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.images.build(recipe), wait)


@router.get("/images/{name}", response_model=ImageOut)
async def show_image(request: Request, name: str) -> ImageOut:
    images = daemon_of(request).images
    return ImageOut.of(await images.show(name), await images.users(name))


@router.delete("/images/{name}")
async def delete_image(request: Request, name: str) -> dict[str, str]:
    await daemon_of(request).images.delete(name)
    return {"deleted": name}
