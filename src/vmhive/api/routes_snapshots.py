"""Snapshots of a VM (a tree) and their schedules."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vmhive.api.deps import daemon_of, job_response
from vmhive.services.snapshot_policy import format_period
from vmhive.store.models import Snapshot, SnapshotSchedule

router = APIRouter(tags=["snapshots"])


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    memory: bool = Field(False, description="save the RAM and device state too")
    description: str = ""


class SnapshotRevert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: bool = Field(False, description="start the VM after reverting to a disk-only snapshot")


class SnapshotOut(BaseModel):
    name: str
    tag: str = Field(description="the internal snapshot's name in each qcow2 disk")
    parent: str | None
    current: bool = Field(description="the VM's present state descends from this one")
    created_at: datetime
    description: str
    with_memory: bool
    vm_state: str = Field(description="running, paused or stopped when it was taken")
    size_bytes: int = Field(description="the saved RAM and device state plus UEFI variables")
    pause_ms: float | None = Field(description="how long the guest was paused for it")
    status: str = Field(description="ready, or creating / reverting / deleting")
    schedule: str | None = Field(description="the period of the schedule that took it")
    vcpus: int | None
    memory_mib: int | None
    disks: list[str]

    @classmethod
    def of(cls, snap: Snapshot, names: dict[int, str], periods: dict[int, int]) -> SnapshotOut:
        hardware = snap.hardware or {}
        return cls(
            name=snap.name,
            tag=snap.tag,
            parent=names.get(snap.parent_id) if snap.parent_id is not None else None,
            current=snap.is_current,
            created_at=snap.created_at,
            description=snap.description,
            with_memory=snap.with_memory,
            vm_state=snap.vm_state,
            size_bytes=snap.size_bytes,
            pause_ms=snap.pause_ms,
            status=snap.status,
            schedule=format_period(periods[snap.schedule_id])
            if snap.schedule_id in periods
            else None,
            vcpus=hardware.get("vcpus"),
            memory_mib=hardware.get("memory_mib"),
            disks=list(hardware.get("disks", [])),
        )


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int = Field(description="how many of this schedule's snapshots to keep")
    memory: bool = Field(False, description="with RAM while the VM runs")


class ScheduleOut(BaseModel):
    every: str
    interval_seconds: int
    keep: int
    memory: bool
    next_run_at: datetime
    last_run_at: datetime | None
    snapshots: int

    @classmethod
    def of(cls, schedule: SnapshotSchedule, count: int) -> ScheduleOut:
        return cls(
            every=format_period(schedule.interval_seconds),
            interval_seconds=schedule.interval_seconds,
            keep=schedule.keep,
            memory=schedule.with_memory,
            next_run_at=schedule.next_run_at,
            last_run_at=schedule.last_run_at,
            snapshots=count,
        )


async def _snapshots_out(request: Request, vm: str) -> list[SnapshotOut]:
    daemon = daemon_of(request)
    _, rows = await daemon.snapshots.list_snapshots(vm)
    periods = {s.id: s.interval_seconds for s, _ in await daemon.schedules.list_schedules(vm)}
    names = {row.id: row.name for row in rows}
    return [SnapshotOut.of(row, names, periods) for row in rows]


@router.get("/vms/{vm}/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(request: Request, vm: str) -> list[SnapshotOut]:
    """Every snapshot of the VM, oldest first; `parent` links make the tree."""
    return await _snapshots_out(request, vm)


@router.post("/vms/{vm}/snapshots", status_code=202)
async def create_snapshot(
    request: Request, vm: str, body: SnapshotCreate, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    job = await daemon.snapshots.create(
        vm, body.name, memory=body.memory, description=body.description
    )
    return await job_response(daemon, job, wait)


@router.get("/vms/{vm}/snapshots/{snapshot}", response_model=SnapshotOut)
async def show_snapshot(request: Request, vm: str, snapshot: str) -> SnapshotOut:
    daemon = daemon_of(request)
    await daemon.snapshots.get(vm, snapshot)  # 404 for an unknown one
    return next(s for s in await _snapshots_out(request, vm) if s.name == snapshot)


@router.post("/vms/{vm}/snapshots/{snapshot}/revert", status_code=202)
async def revert_snapshot(
    request: Request,
    vm: str,
    snapshot: str,
    body: SnapshotRevert | None = None,
    wait: bool = False,
) -> JSONResponse:
    daemon = daemon_of(request)
    start = body.start if body is not None else False
    return await job_response(
        daemon, await daemon.snapshots.revert(vm, snapshot, start=start), wait
    )


@router.delete("/vms/{vm}/snapshots/{snapshot}", status_code=202)
async def delete_snapshot(
    request: Request, vm: str, snapshot: str, wait: bool = False
) -> JSONResponse:
    daemon = daemon_of(request)
    return await job_response(daemon, await daemon.snapshots.delete(vm, snapshot), wait)


@router.get("/vms/{vm}/snapshot-schedules", response_model=list[ScheduleOut])
async def list_schedules(request: Request, vm: str) -> list[ScheduleOut]:
    rows = await daemon_of(request).schedules.list_schedules(vm)
    return [ScheduleOut.of(schedule, count) for schedule, count in rows]


@router.put("/vms/{vm}/snapshot-schedules/{every}", response_model=ScheduleOut)
async def set_schedule(request: Request, vm: str, every: str, body: ScheduleIn) -> ScheduleOut:
    """Snapshot the VM every period (30s ... 1w, hourly, daily, weekly), keeping `keep`."""
    daemon = daemon_of(request)
    schedule = await daemon.schedules.set(vm, every, body.keep, body.memory)
    rows = await daemon.schedules.list_schedules(vm)
    return next(ScheduleOut.of(s, n) for s, n in rows if s.id == schedule.id)


@router.delete("/vms/{vm}/snapshot-schedules/{every}", status_code=204)
async def remove_schedule(request: Request, vm: str, every: str) -> Response:
    await daemon_of(request).schedules.remove(vm, every)
    return Response(status_code=204)
