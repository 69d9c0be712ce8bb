"""Jobs: list, show, wait, cancel."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy import select

from vmhive.api.deps import WAIT_LIMIT, daemon_of
from vmhive.api.schemas import JobOut
from vmhive.store.models import Job

router = APIRouter(tags=["jobs"])


@router.get("/jobs", response_model=list[JobOut])
async def list_jobs(request: Request, limit: int = 50, state: str | None = None) -> list[JobOut]:
    daemon = daemon_of(request)
    query = select(Job).order_by(Job.created_at.desc()).limit(max(1, min(limit, 1000)))
    if state:
        query = query.where(Job.state == state)
    async with daemon.sessions() as session:
        return [JobOut.of(job) for job in await session.scalars(query)]


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(
    request: Request, job_id: str, wait: bool = False, timeout: float = WAIT_LIMIT
) -> JobOut:
    daemon = daemon_of(request)
    if wait:
        with contextlib.suppress(TimeoutError):
            await daemon.runner.wait(job_id, min(timeout, WAIT_LIMIT))
    job = await daemon.runner.get(job_id)
    return JobOut.of(job, await daemon.runner.logs(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel_job(request: Request, job_id: str) -> JobOut:
    daemon = daemon_of(request)
    if not await daemon.runner.cancel(job_id):
        job = await daemon.runner.get(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            raise HTTPException(409, f"job {job_id} has already ended ({job.state})")
        raise HTTPException(409, f"job {job_id} ({job.kind}) cannot be cancelled once running")
    await asyncio.sleep(0)
    return JobOut.of(await daemon.runner.get(job_id), await daemon.runner.logs(job_id))
