"""The FastAPI application: routers, error mapping and authentication."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vmhive.jobs.runner import JobNotFound
from vmhive.services.errors import ServiceError

if TYPE_CHECKING:
    from vmhive.daemon import Daemon


class BearerAuth:
    """Requests over TCP need the bearer token; the 0600 unix socket is trusted.

    uvicorn reports a unix socket's server address as (path, None), so the
    transport is known from the ASGI scope, for HTTP and websockets alike.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
                return
            response = JSONResponse(
                {"detail": "missing or wrong bearer token (see `vmhive token`)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        server = scope.get("server")
        if server is not None and server[1] is None and str(server[0]).startswith("/"):
            return True  # the unix socket (its absolute path, no port)
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self.token
                )
        return False


def create_app(daemon: Daemon) -> FastAPI:
    from vmhive.api import (
        routes_host,
        routes_images,
        routes_jobs,
        routes_networks,
        routes_snapshots,
        routes_storage,
        routes_vms,
    )

    app = FastAPI(
        title="vmhive",
        version="0.1.0",
        description="Manage QEMU/KVM virtual machines. Mutating calls answer 202 with a job.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.daemon = daemon

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(JobNotFound)
    async def job_not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job with id {exc}"}, status_code=404)

    app.include_router(routes_host.router, prefix="/api")
    app.include_router(routes_images.router, prefix="/api")
    app.include_router(routes_networks.router, prefix="/api")
    # Before the VMs' router: /vms/{vm}/disks must win over /vms/{name}/{action}.
    app.include_router(routes_storage.router, prefix="/api")
    app.include_router(routes_snapshots.router, prefix="/api")
    app.include_router(routes_vms.router, prefix="/api")
    app.include_router(routes_jobs.router, prefix="/api")
    return app


def wrap(app: Any, token: str) -> BearerAuth:
    return BearerAuth(app, token)
