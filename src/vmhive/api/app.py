"""The FastAPI application: routers and error mapping (authentication: auth.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from vmhive.api.auth import Auth
from vmhive.api.forward import Forwarder
from vmhive.jobs.runner import JobNotFound
from vmhive.services.errors import ServiceError

if TYPE_CHECKING:
    from vmhive.daemon import Daemon


def create_app(daemon: Daemon) -> FastAPI:
    from vmhive.api import (
        routes_auth,
        routes_consoles,
        routes_events,
        routes_host,
        routes_images,
        routes_jobs,
        routes_metrics,
        routes_migrations,
        routes_networks,
        routes_nodes,
        routes_snapshots,
        routes_storage,
        routes_ui,
        routes_uploads,
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

    app.include_router(routes_auth.router, prefix="/api")
    app.include_router(routes_events.router, prefix="/api")
    app.include_router(routes_host.router, prefix="/api")
    app.include_router(routes_nodes.router, prefix="/api")
    app.include_router(routes_images.router, prefix="/api")
    app.include_router(routes_networks.router, prefix="/api")
    # Before the VMs' router: /vms/{vm}/disks must win over /vms/{name}/{action}.
    app.include_router(routes_storage.router, prefix="/api")
    app.include_router(routes_snapshots.router, prefix="/api")
    app.include_router(routes_consoles.router, prefix="/api")
    app.include_router(routes_migrations.router, prefix="/api")
    app.include_router(routes_uploads.router, prefix="/api")
    app.include_router(routes_vms.router, prefix="/api")
    app.include_router(routes_jobs.router, prefix="/api")
    app.include_router(routes_metrics.router, prefix="/api")
    app.include_router(routes_metrics.root_router)
    app.include_router(routes_ui.router)
    return app


def wrap(app: Any, daemon: Daemon) -> Auth:
    """Admission first (auth.py), then relaying to the owning node (forward.py)."""
    return Auth(Forwarder(app, daemon), daemon.token, daemon.users, daemon.nodes.secret)
