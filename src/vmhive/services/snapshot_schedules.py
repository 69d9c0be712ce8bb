"""Snapshot schedules: the daemon snapshots a VM every period and deletes the oldest
of that schedule's snapshots beyond `keep`. Snapshots taken by hand, or by another
schedule of the same VM, are never expired by it.

One loop sleeps until the soonest run is due (or a schedule changes) and submits a
`snapshot.scheduled` job on the VM's lock, so a scheduled snapshot queues behind
whatever else runs on the VM like any other job. A run that comes due while the
previous one of the same schedule still waits is skipped rather than piled up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from vmhive.jobs.runner import FINAL_STATES, JobContext, JobError, JobNotFound
from vmhive.services import snapshot_policy as policy
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, NotFound, ServiceError
from vmhive.services.snapshots import SnapshotService, check_snapshottable
from vmhive.store.models import Snapshot, SnapshotSchedule, Vm, utcnow

log = logging.getLogger(__name__)

# The loop looks again at least this often, whatever the schedules say.
IDLE_SECONDS = 300.0


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ScheduleService:
    def __init__(self, ctx: ServiceContext, snapshots: SnapshotService) -> None:
        self.ctx = ctx
        self.snapshots = snapshots
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # schedule id -> the id of its job that has not ended yet
        self._pending: dict[int, str] = {}

    # -- configuration --------------------------------------------------------------

    async def set(self, vm_name: str, every: str, keep: int, memory: bool) -> SnapshotSchedule:
        """Create the VM's schedule of this period, or change its keep and memory."""
        period = policy.parse_period(every)
        policy.check_keep(keep)
        vm = await self.ctx.load_vm(vm_name)
        check_snapshottable(vm)
        async with self.ctx.sessions() as session:
            row = await session.scalar(
                select(SnapshotSchedule).where(
                    SnapshotSchedule.vm_id == vm.id, SnapshotSchedule.interval_seconds == period
                )
            )
            if row is None:
                row = SnapshotSchedule(
                    vm_id=vm.id,
                    interval_seconds=period,
                    next_run_at=policy.next_run(utcnow(), period),
                )
                session.add(row)
            row.keep, row.with_memory = keep, memory
            await session.commit()
        self._wake.set()
        return row

    async def remove(self, vm_name: str, every: str) -> None:
        period = policy.parse_period(every)
        vm = await self.ctx.load_vm(vm_name)
        async with self.ctx.sessions() as session:
            row = await session.scalar(
                select(SnapshotSchedule).where(
                    SnapshotSchedule.vm_id == vm.id, SnapshotSchedule.interval_seconds == period
                )
            )
            if row is None:
                raise NotFound(f"VM {vm_name} has no schedule every {policy.format_period(period)}")
            await session.delete(row)
            await session.commit()
        self._wake.set()

    async def list_schedules(self, vm_name: str) -> list[tuple[SnapshotSchedule, int]]:
        """The VM's schedules, each with the number of snapshots it holds now."""
        vm = await self.ctx.load_vm(vm_name)
        async with self.ctx.sessions() as session:
            rows = await session.execute(
                select(SnapshotSchedule, func.count(Snapshot.id))
                .outerjoin(Snapshot, Snapshot.schedule_id == SnapshotSchedule.id)
                .where(SnapshotSchedule.vm_id == vm.id)
                .group_by(SnapshotSchedule.id)
                .order_by(SnapshotSchedule.interval_seconds)
            )
            return [(schedule, count) for schedule, count in rows]

    # -- the loop -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="snapshot-schedules")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self.run_due()
            except Exception:
                log.exception("snapshot schedules: a pass failed")
                delay = IDLE_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def run_due(self, now: datetime | None = None) -> float:
        """Submit the runs that are due; returns the seconds until the next one."""
        now = now or utcnow()
        due: list[tuple[int, int, str, str]] = []
        soonest = now + timedelta(seconds=IDLE_SECONDS)
        async with self.ctx.sessions() as session:
            rows = await session.execute(
                select(SnapshotSchedule, Vm.uuid, Vm.name).join(Vm, Vm.id == SnapshotSchedule.vm_id)
            )
            for schedule, vm_uuid, vm_name in rows:
                if aware(schedule.next_run_at) <= now:
                    due.append((schedule.id, schedule.interval_seconds, vm_uuid, vm_name))
                    schedule.last_run_at = now
                    schedule.next_run_at = policy.next_run(now, schedule.interval_seconds)
                soonest = min(soonest, aware(schedule.next_run_at))
            await session.commit()
        for schedule_id, period, vm_uuid, vm_name in due:
            await self._submit(schedule_id, period, vm_uuid, vm_name, now)
        return max(0.0, (soonest - utcnow()).total_seconds())

    async def _submit(
        self, schedule_id: int, period: int, vm_uuid: str, vm_name: str, at: datetime
    ) -> None:
        previous = self._pending.get(schedule_id)
        if previous is not None and not await self._ended(previous):
            log.warning(
                "VM %s: the %s snapshot is skipped, the previous one has not run yet",
                vm_name,
                policy.format_period(period),
            )
            return

        async def job(ctx: JobContext) -> dict[str, Any]:
            return await self._run(ctx, vm_uuid, schedule_id, at)

        self._pending[schedule_id] = await self.ctx.runner.submit(
            "snapshot.scheduled",
            f"vm:{vm_uuid}",
            job,
            params={"name": vm_name, "every": policy.format_period(period)},
        )

    async def _ended(self, job_id: str) -> bool:
        try:
            return (await self.ctx.runner.get(job_id)).state in FINAL_STATES
        except JobNotFound:
            return True

    async def _run(
        self, ctx: JobContext, vm_uuid: str, schedule_id: int, at: datetime
    ) -> dict[str, Any]:
        """One run, named after the moment it came due: a snapshot, then the expiry."""
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        async with self.ctx.sessions() as session:
            schedule = await session.get(SnapshotSchedule, schedule_id)
        if vm is None or schedule is None:
            await ctx.log("the VM or its schedule is gone: nothing to do")
            return {"skipped": True}
        try:
            check_snapshottable(vm)
        except ServiceError as exc:
            await ctx.log(f"skipped: {exc}")
            return {"vm": vm.name, "skipped": True}
        memory = schedule.with_memory and self.ctx.driver.is_running(vm.uuid)
        every = policy.format_period(schedule.interval_seconds)
        name = policy.scheduled_name(schedule.interval_seconds, at)
        try:
            snap_id = await self.snapshots.reserve(
                vm, name, memory=memory, description=f"every {every}", schedule_id=schedule.id
            )
        except Conflict as exc:
            raise JobError(str(exc)) from None
        result = await self.snapshots.take(ctx, vm_uuid, snap_id)
        async with self.ctx.sessions() as session:
            ours = list(
                await session.execute(
                    select(Snapshot.id, Snapshot.created_at).where(
                        Snapshot.schedule_id == schedule.id, Snapshot.status == "ready"
                    )
                )
            )
        expired = []
        for old_id in policy.expired([(i, aware(at)) for i, at in ours], schedule.keep):
            vm, old = await self.snapshots.load(vm_uuid, old_id)
            await self.snapshots.delete_now(ctx, vm, old)
            expired.append(old.name)
        if expired:
            await ctx.log(f"expired (keeping {schedule.keep}): {', '.join(expired)}")
        return {**result, "expired": expired}
