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
FOREIGN_POLL = 0.2  # seconds between reads of a job another node runs

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
class _Live:
    """A job that has not ended: its current row and log live in memory.

    The row is inserted at submission (so a daemon crash leaves a trace that
    recovery fails), progress and log lines are flushed at most every
    FLUSH_DELAY seconds, and the final state is written in one transaction
    with the remaining log lines. Readers of a live job get the in-memory view.
    """

    job: Job
    done: asyncio.Event
    cancellable: bool
    task: asyncio.Task[None] | None = None
    logs: list[JobLog] = field(default_factory=list)
    flushed_logs: int = 0
    flush_handle: asyncio.TimerHandle | None = None
    flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


FLUSH_DELAY = 0.5


class JobRunner:
    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self._sessions = sessions
        self._locks: dict[str, asyncio.Lock] = {}
        self._live: dict[str, _Live] = {}
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        # This daemon's node (set once it registered): its jobs carry it, and
        # recovery after a stop fails only its own, never another node's.
        self.node_id: int | None = None

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
        job = Job(
            id=job_id,
            kind=kind,
            target=target,
            state=QUEUED,
            progress=0,
            params=params or {},
            created_at=utcnow(),
            node_id=self.node_id,
        )
        async with self._sessions() as session:
            session.add(job)
            await session.commit()
        live = _Live(job=job, done=asyncio.Event(), cancellable=cancellable)
        self._live[job_id] = live
        live.task = asyncio.create_task(self._run(live, fn), name=f"job-{kind}")
        self._notify(job_id)
        return job_id

    async def _run(self, live: _Live, fn: JobFn) -> None:
        job = live.job
        lock = self._locks.setdefault(job.target, asyncio.Lock()) if job.target else None
        ctx = JobContext(job.id, self)
        final: dict[str, Any]
        try:
            if lock is not None:
                await lock.acquire()
            try:
                self._update(live, state=RUNNING, started_at=utcnow())
                result = await fn(ctx)
                final = {"state": SUCCEEDED, "progress": 100, "result": result}
            except asyncio.CancelledError:
                await self._rollback(ctx)
                final = {"state": CANCELLED, "error": "cancelled by the user"}
            except Exception as exc:
                message = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, JobError):
                    log.exception("job %s failed", job.id)
                await self.append_log(job.id, f"error: {message}")
                await self._rollback(ctx)
                final = {"state": FAILED, "error": message}
            finally:
                if lock is not None:
                    lock.release()
        except asyncio.CancelledError:
            final = {"state": CANCELLED, "error": "cancelled before it started"}
        try:
            self._update(live, finished_at=utcnow(), **final)
            await asyncio.shield(self._flush(live))
        finally:
            self._live.pop(job.id, None)
            live.done.set()
            self._notify(job.id)

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
        """Until the job has ended. A job another node runs (a shared database) is
        followed through its row, which its runner flushes as it goes."""
        live = self._live.get(job_id)
        if live is not None:
            await asyncio.wait_for(live.done.wait(), timeout)
            return
        async with asyncio.timeout(timeout):
            while (await self.get(job_id)).state not in FINAL_STATES:  # JobNotFound: unknown
                await asyncio.sleep(FOREIGN_POLL)

    async def get(self, job_id: str) -> Job:
        live = self._live.get(job_id)
        if live is not None:
            return live.job
        async with self._sessions() as session:
            job = await session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    async def logs(self, job_id: str) -> list[JobLog]:
        live = self._live.get(job_id)
        if live is not None:
            return list(live.logs)
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
        live = self._live.get(job_id)
        if live is None or live.task is None:
            await self.get(job_id)
            return False
        if live.job.state == RUNNING and not live.cancellable:
            return False
        live.task.cancel()
        await asyncio.shield(live.done.wait())
        return True

    async def recover(self) -> list[Job]:
        """Fail every job that a previous daemon left queued or running."""
        async with self._sessions() as session:
            mine = Job.node_id.is_(None) if self.node_id is None else Job.node_id == self.node_id
            rows = list(
                await session.scalars(select(Job).where(Job.state.in_([QUEUED, RUNNING]), mine))
            )
            for job in rows:
                job.state = FAILED
                job.error = "interrupted: the daemon stopped while this job ran"
                job.finished_at = utcnow()
            await session.commit()
        return rows

    async def shutdown(self) -> None:
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- persistence ------------------------------------------------------

    async def append_log(self, job_id: str, message: str) -> None:
        live = self._live[job_id]
        live.logs.append(
            JobLog(job_id=job_id, seq=len(live.logs) + 1, at=utcnow(), message=message)
        )
        self._schedule_flush(live)
        self._notify(job_id)

    async def set_progress(self, job_id: str, percent: int) -> None:
        live = self._live[job_id]
        self._update(live, progress=max(0, min(100, int(percent))))
        self._schedule_flush(live)

    def _update(self, live: _Live, **values: Any) -> None:
        for key, value in values.items():
            setattr(live.job, key, value)
        self._notify(live.job.id)

    def _schedule_flush(self, live: _Live) -> None:
        if live.flush_handle is None:
            loop = asyncio.get_running_loop()
            live.flush_handle = loop.call_later(
                FLUSH_DELAY, lambda: asyncio.ensure_future(self._flush(live))
            )

    async def _flush(self, live: _Live) -> None:
        """Write the job's row and any new log lines in one transaction."""
        if live.flush_handle is not None:
            live.flush_handle.cancel()
            live.flush_handle = None
        # Serialized, and the values are read under the lock: a slow earlier
        # flush can never overwrite a later state.
        async with live.flush_lock:
            job = live.job
            fresh = live.logs[live.flushed_logs :]
            live.flushed_logs = len(live.logs)
            values = {
                "state": job.state,
                "progress": job.progress,
                "error": job.error,
                "result": job.result,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
            }
            async with self._sessions() as session:
                await session.execute(update(Job).where(Job.id == job.id).values(**values))
                session.add_all(
                    JobLog(job_id=e.job_id, seq=e.seq, at=e.at, message=e.message) for e in fresh
                )
                await session.commit()
