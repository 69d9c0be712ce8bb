"""Live updates for the web UI: Server-Sent Events of VM states and jobs.

`event: vm` carries {name, uuid, state, reason} (or {name, uuid, deleted}) on
every observed state change; `event: job` carries a job (as GET /api/jobs/ID
without its log) whenever its state or progress changes, at most every
JOB_COALESCE seconds per job. A `: ping` comment every PING seconds keeps
proxies from closing an idle stream. A client that falls MAX_QUEUED events
behind gets `event: overflow` and the stream ends; EventSource reconnects,
and the page refetches what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from vmhive.api.deps import daemon_of
from vmhive.api.schemas import JobOut
from vmhive.jobs.runner import JobNotFound

router = APIRouter(tags=["events"])

PING = 15.0
JOB_COALESCE = 0.25


def _frame(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get("/events")
async def events(request: Request) -> StreamingResponse:
    daemon = daemon_of(request)
    vm_events = daemon.ctx.events.subscribe()
    job_events = daemon.runner.subscribe()

    async def stream() -> AsyncIterator[bytes]:
        pending: set[str] = set()
        flush_at = 0.0
        loop = asyncio.get_running_loop()
        vm_get = asyncio.ensure_future(vm_events.get())
        job_get = asyncio.ensure_future(job_events.get())
        try:
            yield b"retry: 2000\n: connected\n\n"
            while True:
                timeout = max(0.0, flush_at - loop.time()) if pending else PING
                done, _ = await asyncio.wait(
                    {vm_get, job_get}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if vm_get in done:
                    kind, data = vm_get.result()
                    yield _frame(kind, data)
                    if kind == "overflow":
                        return
                    vm_get = asyncio.ensure_future(vm_events.get())
                if job_get in done:
                    if not pending:
                        flush_at = loop.time() + JOB_COALESCE
                    pending.add(job_get.result()["job"])
                    job_get = asyncio.ensure_future(job_events.get())
                if pending and loop.time() >= flush_at:
                    for job_id in sorted(pending):
                        with contextlib.suppress(JobNotFound):
                            job = await daemon.runner.get(job_id)
                            yield _frame("job", JobOut.of(job).model_dump(mode="json"))
                    pending.clear()
                elif not done and not pending:
                    yield b": ping\n\n"
        finally:
            for task in (vm_get, job_get):
                task.cancel()
            daemon.ctx.events.unsubscribe(vm_events)
            daemon.runner.unsubscribe(job_events)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
