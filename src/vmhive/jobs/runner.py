"""The job runner: every mutating operation runs as a persisted job.

A job has an id, a kind, a target, a state (queued -> running -> succeeded |
failed | cancelled), progress 0-100, numbered log lines and an error. Jobs on
the same target (one VM) run one at a time in submission order; the others
wait in `queued`. A job's function registers rollback steps as it goes; on
failure or cancellation they run in reverse order, so no operation is left
half-done.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from vmhive.store.models import Job, JobLog, utcnow

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

RollbackStep = Callable[[], Awaitable[None]]


class JobError(Exception):
    """An operation failed in a way the user should read as the job's error."""


class JobNotFound(LookupError):
    pass


@dataclass
class JobContext:
    """Handed to a job's function: progress, log and rollback registration."""

    job_id: str
    runner: JobRunner
    rollback_steps: list[tuple[str, RollbackStep]] = field(default_factory=list)

    async def log(self, message: str) -> None:
        await self.runner.append_log(self.job_id, message)

    async def progress(self, percent: int) -> None:
        await self.runner.set_progress(self.job_id, percent)

    def on_rollback(self, description: str, step: RollbackStep) -> None:
        self.rollback_steps.append((description, step))

    def commit(self) -> None:
        """The operation reached a point of no return: nothing to undo from here."""
        self.rollback_steps.clear()


JobFn = Callable[[JobContext], Awaitable[dict[str, Any] | None]]


@dataclass
class _Running:
    task: asyncio.Task[None] | None
    done: asyncio.Event
    cancellable: bool


class JobRunner:
    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self._sessions = sessions
        self._locks: dict[str, asyncio.Lock] = {}
        self._live: dict[str, _Running] = {}
        self._log_seq: dict[str, int] = {}
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()

    # -- submission -------------------------------------------------------

    async def submit(
        self,
        kind: str,
        target: str | None,
        fn: JobFn,
        *,
        params: dict[str, Any] | None = None,
        cancellable: bool = False,
    ) -> str:
        job_id = str(uuid.uuid4())
        async with self._sessions() as session:
            session.add(Job(id=job_id, kind=kind, target=target, params=params or {}))
            await session.commit()
        running = _Running(task=None, done=asyncio.Event(), cancellable=cancellable)
        self._live[job_id] = running
        running.task = asyncio.create_task(self._run(job_id, target, fn), name=f"job-{kind}")
        self._notify(job_id)
        return job_id

    async def _run(self, job_id: str, target: str | None, fn: JobFn) -> None:
        running = self._live[job_id]
        lock = self._locks.setdefault(target, asyncio.Lock()) if target else None
        ctx = JobContext(job_id, self)
        try:
            if lock is not None:
                await lock.acquire()
            try:
                await self._set(job_id, state=RUNNING, started_at=utcnow())
                result = await fn(ctx)
                await self._set(
                    job_id, state=SUCCEEDED, progress=100, result=result, finished_at=utcnow()
                )
            except asyncio.CancelledError:
                await self._rollback(ctx)
                await self._set(
                    job_id, state=CANCELLED, error="cancelled by the user", finished_at=utcnow()
                )
            except Exception as exc:
                message = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, JobError):
                    log.exception("job %s failed", job_id)
                await self.append_log(job_id, f"error: {message}")
                await self._rollback(ctx)
                await self._set(job_id, state=FAILED, error=message, finished_at=utcnow())
            finally:
                if lock is not None:
                    lock.release()
        except asyncio.CancelledError:
            # Cancelled while still queued for the lock.
            await self._set(
                job_id, state=CANCELLED, error="cancelled before it started", finished_at=utcnow()
            )
        finally:
            running.done.set()
            self._live.pop(job_id, None)
            self._log_seq.pop(job_id, None)
            self._notify(job_id)

    async def _rollback(self, ctx: JobContext) -> None:
        for description, step in reversed(ctx.rollback_steps):
            try:
                await ctx.log(f"rollback: {description}")
                await step()
            except Exception as exc:  # keep undoing the rest
                log.exception("rollback step %r of job %s failed", description, ctx.job_id)
                await ctx.log(f"rollback step failed: {description}: {exc}")
        ctx.rollback_steps.clear()

    # -- observation ------------------------------------------------------

    async def wait(self, job_id: str, timeout: float | None = None) -> None:
        running = self._live.get(job_id)
        if running is None:
            await self.get(job_id)  # raises JobNotFound for unknown ids
            return
        await asyncio.wait_for(running.done.wait(), timeout)

    async def get(self, job_id: str) -> Job:
        async with self._sessions() as session:
            job = await session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    async def logs(self, job_id: str) -> list[JobLog]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.seq)
            )
            return list(rows)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._listeners.discard(queue)

    def _notify(self, job_id: str) -> None:
        for queue in list(self._listeners):
            if not queue.full():
                queue.put_nowait({"job": job_id})

    def busy(self, target: str) -> bool:
        """True while a job on this target runs or waits."""
        lock = self._locks.get(target)
        return lock is not None and lock.locked()

    # -- control ----------------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or a running one whose operation allows it."""
        running = self._live.get(job_id)
        if running is None or running.task is None:
            await self.get(job_id)
            return False
        job = await self.get(job_id)
        if job.state == RUNNING and not running.cancellable:
            return False
        running.task.cancel()
        await asyncio.shield(running.done.wait())
        return True

    async def recover(self) -> list[Job]:
        """Fail every job that a previous daemon left queued or running."""
        async with self._sessions() as session:
            rows = list(await session.scalars(select(Job).where(Job.state.in_([QUEUED, RUNNING]))))
            for job in rows:
                job.state = FAILED
                job.error = "interrupted: the daemon stopped while this job ran"
                job.finished_at = utcnow()
            await session.commit()
        return rows

    async def shutdown(self) -> None:
        tasks = [r.task for r in self._live.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- persistence ------------------------------------------------------

    async def append_log(self, job_id: str, message: str) -> None:
        seq = self._log_seq.get(job_id, 0) + 1
        self._log_seq[job_id] = seq
        async with self._sessions() as session:
            session.add(JobLog(job_id=job_id, seq=seq, message=message))
            await session.commit()
        self._notify(job_id)

    async def set_progress(self, job_id: str, percent: int) -> None:
        await self._set(job_id, progress=max(0, min(100, int(percent))))

    async def _set(self, job_id: str, **values: Any) -> None:
        async with self._sessions() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(**values))
            await session.commit()
        self._notify(job_id)
