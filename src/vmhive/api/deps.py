"""Helpers shared by the routers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from vmhive.api.schemas import JobOut

if TYPE_CHECKING:
    from vmhive.daemon import Daemon

WAIT_LIMIT = 3600.0


def daemon_of(request: Request) -> Daemon:
    daemon: Daemon = request.app.state.daemon
    return daemon


async def job_response(daemon: Daemon, job_id: str, wait: bool) -> JSONResponse:
    """202 with the job; with ?wait=true, 200 with the job once it has ended."""
    if wait:
        await daemon.runner.wait(job_id, WAIT_LIMIT)
    job = await daemon.runner.get(job_id)
    logs = await daemon.runner.logs(job_id) if wait else None
    body = JobOut.of(job, logs).model_dump(mode="json")
    return JSONResponse(
        body, status_code=200 if wait else 202, headers={"Location": f"/api/jobs/{job_id}"}
    )
