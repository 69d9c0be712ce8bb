"""The web UI: `/` is the single page, `/ui/...` its static files (from the package)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import vmhive.web

router = APIRouter(include_in_schema=False)

STATIC = Path(vmhive.web.__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
# Revalidate every time (the ETag makes that a cheap 304): file names are not
# versioned, and an upgraded daemon must never run against yesterday's scripts.
CACHE_CONTROL = "no-cache"


@functools.lru_cache(maxsize=256)
def _load(path: Path, mtime_ns: int, size: int) -> tuple[bytes, str]:
    """A file's bytes and ETag, kept in memory: the UI is a few hundred KiB, and
    serving from memory keeps page loads fast on a busy host (no thread hop per
    file). Keyed by mtime and size, so a changed file is read again."""
    data = path.read_bytes()
    return data, f'"{hashlib.blake2b(data, digest_size=16).hexdigest()}"'


def static_file(request: Request, relative: str) -> Response:
    """The file at `relative` under static/, or 404: no dot files, nothing outside it.

    Answers 304 when the browser's copy (If-None-Match) is current.
    """
    parts = relative.split("/")
    if "\x00" in relative or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return not_found()
    path = STATIC.joinpath(*parts).resolve()
    content_type = CONTENT_TYPES.get(path.suffix)
    if content_type is None or not path.is_relative_to(STATIC) or not path.is_file():
        return not_found()
    stat = path.stat()
    data, etag = _load(path, stat.st_mtime_ns, stat.st_size)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    given = request.headers.get("if-none-match", "")
    if etag in (tag.strip() for tag in given.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=content_type, headers=headers)


def not_found() -> JSONResponse:
    return JSONResponse({"detail": "not found"}, status_code=404)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    return static_file(request, "index.html")


@router.get("/favicon.ico")
async def favicon(request: Request) -> Response:
    return static_file(request, "icon.svg")


@router.api_route("/ui/{relative:path}", methods=["GET", "HEAD"])
async def ui_file(request: Request, relative: str) -> Response:
    return static_file(request, relative)
