"""The web UI's static files as routes_ui serves them (no browser, no daemon)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from vmhive.api import routes_ui

STATIC = routes_ui.STATIC
IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["'](\.{1,2}/[^"'`$]+)["']""")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(routes_ui.router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://vmhive") as client:
        yield client


async def test_index_and_assets(client: httpx.AsyncClient) -> None:
    index = await client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="/ui/js/app.js">' in index.text
    script = await client.get("/ui/js/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert (await client.get("/ui/css/app.css")).headers[
        "content-type"
    ] == "text/css; charset=utf-8"
    assert (await client.get("/favicon.ico")).headers["content-type"] == "image/svg+xml"
    assert (await client.head("/")).status_code == 200
    # Revalidation is a cheap 304.
    again = await client.get("/ui/js/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize(
    "path",
    [
        "/ui/missing.js",
        "/ui/js",  # a directory
        "/ui/js/",
        "/ui/../__init__.py",
        "/ui/%2e%2e/__init__.py",
        "/ui/js/%2e%2e/%2e%2e/__init__.py",
        "/ui/js/..%2f..%2f__init__.py",
        "/ui/vendor/.stamp",  # dot files are not served
        "/ui//etc/passwd",
        "/ui/index.html%00.js",
    ],
)
async def test_nothing_else_is_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404, (path, response.text[:200])


def test_vendor_files_are_built() -> None:
    """scripts/build-ui.sh copied the pinned npm packages' files the app imports."""
    for name in ("xterm/xterm.mjs", "xterm/addon-fit.mjs", "xterm/xterm.css",
                 "novnc/core/rfb.js", "uplot/uPlot.esm.js", "uplot/uPlot.min.css"):  # fmt: skip
        assert (STATIC / "vendor" / name).is_file(), f"{name} missing: run scripts/build-ui.sh"


def test_every_relative_import_resolves() -> None:
    """Each module the app (and noVNC) imports exists: a typo would only show in a browser."""
    checked = 0
    for module in STATIC.rglob("*.js"):
        for target in IMPORT.findall(module.read_text()):
            resolved = (module.parent / target).resolve()
            assert resolved.is_file(), f"{module.relative_to(STATIC)} imports missing {target}"
            assert resolved.is_relative_to(STATIC)
            checked += 1
    assert checked > 50
    for page in ("dashboard", "vms", "wizard", "vm", "storage", "networks", "jobs"):
        assert (STATIC / "js" / "pages" / f"{page}.js").is_file()


def test_no_inline_script_in_the_page() -> None:
    """The daemon's Content-Security-Policy allows scripts from files only."""
    text = (STATIC / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", text) == []
    assert "onclick=" not in text and "onload=" not in text
    assert Path(STATIC / "icon.svg").is_file()
