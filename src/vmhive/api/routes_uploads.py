"""Uploads from the browser: the request body is the file, then it is imported.

The body streams into `<data-dir>/uploads/<random>/` (never into memory), then
goes through exactly the import a file on the daemon's host would (the same
checks of untrusted images), as a job. The upload is removed when that job
ends, when the import is refused, and when the client goes away mid-way; a
daemon restart sweeps what a crash left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from vmhive.api.deps import daemon_of, job_response
from vmhive.services.errors import InvalidRequest
from vmhive.services.images import check_image_name
from vmhive.services.media import ISO_NAME_RE
from vmhive.services.volumes import check_volume_name
from vmhive.tasks import spawn

router = APIRouter(tags=["storage"])

SPARE_BYTES = 256 * 1024 * 1024  # left free on the data dir's filesystem after an upload
WRITE_CHUNK = 1024 * 1024


def uploads_dir(data_dir: Path) -> Path:
    return data_dir / "uploads"


def sweep_uploads(data_dir: Path) -> None:
    """At start: nothing in the uploads directory belongs to a live request."""
    shutil.rmtree(uploads_dir(data_dir), ignore_errors=True)


async def _receive(request: Request, name: str) -> Path:
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "an upload needs a Content-Length")
    size = int(length)
    daemon = daemon_of(request)
    root = uploads_dir(daemon.settings.data_dir)
    root.mkdir(mode=0o700, exist_ok=True)
    free = shutil.disk_usage(root).free
    if size + SPARE_BYTES > free:
        raise HTTPException(413, f"not enough space for {size} bytes ({free} free)")
    folder = root / secrets.token_hex(8)
    folder.mkdir(mode=0o700)
    path = folder / name
    received = 0
    try:
        with path.open("wb") as out:
            buffer = bytearray()
            async for chunk in request.stream():
                received += len(chunk)
                if received > size:
                    raise HTTPException(400, "the body is longer than its Content-Length")
                buffer += chunk
                if len(buffer) >= WRITE_CHUNK:
                    await asyncio.to_thread(out.write, bytes(buffer))
                    buffer.clear()
            out.write(buffer)
        if received != size:
            raise HTTPException(400, f"the upload ended after {received} of {size} bytes")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


async def _import(
    request: Request, name: str, wait: bool, start: Callable[[str], Awaitable[str]]
) -> JSONResponse:
    daemon = daemon_of(request)
    path = await _receive(request, name)
    try:
        job_id = await start(os.fspath(path))
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise

    async def remove_when_done() -> None:
        with contextlib.suppress(Exception):
            await daemon.runner.wait(job_id, None)
        shutil.rmtree(path.parent, ignore_errors=True)

    spawn(remove_when_done())
    return await job_response(daemon, job_id, wait)


@router.put("/isos/{name}/upload", status_code=202)
async def upload_iso(request: Request, name: str, wait: bool = False) -> JSONResponse:
    if not ISO_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid ISO name {name!r}: letters, digits, '.', '_', '+' and '-'")
    media = daemon_of(request).media
    return await _import(request, name, wait, lambda path: media.import_file(path, name))


@router.put("/images/{name}/upload", status_code=202)
async def upload_image(
    request: Request, name: str, wait: bool = False, format: str = "auto"
) -> JSONResponse:
    check_image_name(name)
    images = daemon_of(request).images
    return await _import(request, name, wait, lambda path: images.import_image(path, name, format))


@router.put("/pools/{pool}/volumes/{name}/upload", status_code=202)
async def upload_volume(
    request: Request, pool: str, name: str, wait: bool = False, format: str = "auto"
) -> JSONResponse:
    check_volume_name(name)
    volumes = daemon_of(request).volumes
    return await _import(
        request, name, wait, lambda path: volumes.import_file(pool, name, path, format)
    )
