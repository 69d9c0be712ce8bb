"""Snapshots of VMs: take, revert, delete, and recover what a crash interrupted.

Each snapshot is an internal qcow2 snapshot with one tag in every disk of the
VM (with the RAM and device state saved into the first disk's when taken
with memory) plus a copy of the VM's UEFI variables file, made in the same
pause. Internal snapshots are independent points: reverting to any of them,
or deleting any of them, leaves the others as they were. The tree (parent,
current) is vmhive's record in the `snapshots` table. See docs/architecture.md,
"Snapshots", for the choice of mechanism.

Every operation holds the VM's job lock, so there is one at a time per VM,
and marks the row first (creating, reverting, deleting) so that `recover`
can roll an interrupted one back (creating) or forward (the others).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from vmhive.hypervisor.base import DriverError
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import snapshot_policy as policy
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.services.lifecycle import Lifecycle
from vmhive.storage import qemu_img
from vmhive.store.models import Event, Snapshot, Vm, utcnow

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
TAG_PREFIX = "vmhive-"
STOP_DEADLINE = 15.0


@dataclass(frozen=True)
class SnapshotSource:
    """What a clone takes from a snapshot: the disks at that point and the UEFI variables."""

    tag: str
    disks: list[Path]
    vars_file: Path | None
    vcpus: int
    memory_mib: int


def vars_copy(vm_directory: Path, tag: str) -> Path:
    """Where a snapshot keeps its copy of the VM's UEFI variables."""
    return vm_directory / SNAPSHOT_DIR / f"{tag}.fd"


def _copy_private(src: Path, dest: Path) -> None:
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o600)


def check_snapshottable(vm: Vm) -> None:
    """What every snapshot operation needs of the VM; raises a 4xx error otherwise."""
    if vm.is_template:
        raise Conflict(f"VM {vm.name} is a template: its disks are read-only")
    if vm.state in ("creating", "deleting"):
        raise Conflict(f"VM {vm.name} is {vm.state}")
    if not vm.disks:
        raise InvalidRequest(f"VM {vm.name} has no disks to snapshot")
    if any(d.volume_id is not None for d in vm.disks):
        raise InvalidRequest(
            f"VM {vm.name} has pool volumes attached: snapshots of those are not supported "
            "yet (volumes outlive the VM); detach them first"
        )
    raw = [f"disk{d.index}" for d in vm.disks if d.format != "qcow2"]
    if raw:
        raise InvalidRequest(
            f"VM {vm.name}: {', '.join(raw)} not qcow2; only qcow2 disks hold snapshots"
        )


async def snapshot_source(ctx: ServiceContext, vm: Vm, name: str) -> SnapshotSource:
    """A ready snapshot of `vm`, as a clone reads it."""
    async with ctx.sessions() as session:
        snap = await session.scalar(
            select(Snapshot).where(Snapshot.vm_id == vm.id, Snapshot.name == name)
        )
    if snap is None:
        raise NotFound(f"VM {vm.name} has no snapshot named {name!r}")
    if snap.status != "ready":
        raise Conflict(f"snapshot {name} of {vm.name} is {snap.status}")
    copy = vars_copy(specs.vm_dir(ctx.settings, vm), snap.tag)
    return SnapshotSource(
        tag=snap.tag,
        disks=[Path(p) for p in snap.hardware["disks"]],
        vars_file=copy if copy.exists() else None,
        vcpus=int(snap.hardware["vcpus"]),
        memory_mib=int(snap.hardware["memory_mib"]),
    )


class SnapshotService:
    def __init__(self, ctx: ServiceContext, lifecycle: Lifecycle) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle

    # -- reading ------------------------------------------------------------------

    async def list_snapshots(self, vm_name: str) -> tuple[Vm, list[Snapshot]]:
        vm = await self.ctx.load_vm(vm_name)
        async with self.ctx.sessions() as session:
            rows = await session.scalars(
                select(Snapshot)
                .where(Snapshot.vm_id == vm.id)
                .order_by(Snapshot.created_at, Snapshot.id)
            )
            return vm, list(rows)

    async def get(self, vm_name: str, name: str) -> tuple[Vm, Snapshot]:
        vm = await self.ctx.load_vm(vm_name)
        async with self.ctx.sessions() as session:
            snap = await session.scalar(
                select(Snapshot).where(Snapshot.vm_id == vm.id, Snapshot.name == name)
            )
        if snap is None:
            raise NotFound(f"VM {vm_name} has no snapshot named {name!r}")
        return vm, snap

    # -- create -------------------------------------------------------------------

    async def create(
        self, vm_name: str, name: str, *, memory: bool = False, description: str = ""
    ) -> str:
        policy.check_name(name)
        vm = await self.ctx.load_vm(vm_name)
        check_snapshottable(vm)
        if memory and not self.ctx.driver.is_running(vm.uuid):
            raise Conflict(
                f"VM {vm_name} is not running: there is no memory to save "
                "(take a disk-only snapshot)"
            )
        snap_id = await self.reserve(vm, name, memory=memory, description=description)
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            return await self.take(ctx, vm_uuid, snap_id)

        try:
            return await self.ctx.runner.submit(
                "snapshot.create", f"vm:{vm_uuid}", job, params={"name": vm_name, "snapshot": name}
            )
        except BaseException:
            await self._delete_row(snap_id)
            raise

    async def reserve(
        self,
        vm: Vm,
        name: str,
        *,
        memory: bool,
        description: str = "",
        schedule_id: int | None = None,
    ) -> int:
        """Insert the row (status creating): the name is taken from this moment on."""
        async with self.ctx.sessions() as session:
            snap = Snapshot(
                vm_id=vm.id,
                name=name,
                tag=f"{TAG_PREFIX}{uuidlib.uuid4().hex}",
                description=description,
                with_memory=memory,
                vm_state="",  # set under the VM's lock, once the job runs
                status="creating",
                schedule_id=schedule_id,
                hardware={},
            )
            session.add(snap)
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"VM {vm.name} already has a snapshot named {name!r}") from None
            return snap.id

    async def take(self, ctx: JobContext, vm_uuid: str, snap_id: int) -> dict[str, Any]:
        """The job's body: snapshot every disk (and the RAM) at one instant."""
        vm, snap = await self.load(vm_uuid, snap_id)

        async def discard() -> None:
            await self._discard(vm_uuid, snap_id, repair=True)

        ctx.on_rollback(f"remove the unfinished snapshot {snap.name}", discard)
        try:
            check_snapshottable(vm)
        except (Conflict, InvalidRequest) as exc:
            raise JobError(str(exc)) from None
        running = self.ctx.driver.is_running(vm.uuid)
        if snap.with_memory and not running:
            raise JobError(f"VM {vm.name} is not running: there is no memory to save")
        directory = specs.vm_dir(self.ctx.settings, vm)
        vars_file = directory / specs.VARS_FILE if vm.generation == 2 else None
        copy = vars_copy(directory, snap.tag)
        indexes = [d.index for d in vm.disks]
        paths = [Path(d.path) for d in vm.disks]
        vm_state = vm.state if running else "stopped"
        hardware = {
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "disks": [str(p) for p in paths],
        }
        await self._set(snap_id, vm_state=vm_state, hardware=hardware)

        async def copy_vars() -> None:
            # In the guest's pause: a copy of a few hundred KiB, done at once rather
            # than handed to a thread, keeps the pause short.
            if vars_file is not None:
                try:
                    _copy_private(vars_file, copy)
                except OSError as exc:
                    raise JobError(f"cannot copy the UEFI variables: {exc}") from exc

        pause_ms = None
        what = "disks, RAM and device state" if snap.with_memory else f"{len(paths)} disk(s)"
        if running:
            frozen = None
            if not snap.with_memory:  # with RAM, the guest resumes mid-write anyway
                try:
                    frozen = await self.ctx.driver.freeze_filesystems(vm.uuid)
                except DriverError as exc:
                    raise JobError(str(exc)) from exc
                await ctx.log(
                    "no guest agent: the snapshot is crash-consistent"
                    if frozen is None
                    else f"the guest agent froze {frozen} filesystem(s): application-consistent"
                )
            await ctx.log(f"snapshot of the running VM's {what}; the guest pauses for it")
            try:
                paused = await self.ctx.driver.snapshot(
                    vm.uuid, snap.tag, indexes, memory=snap.with_memory, while_paused=copy_vars
                )
            except DriverError as exc:
                raise JobError(str(exc)) from exc
            finally:
                if frozen is not None:
                    try:
                        thawed = await self.ctx.driver.thaw_filesystems(vm.uuid)
                        await ctx.log(f"the guest agent thawed {thawed} filesystem(s)")
                    except DriverError as exc:
                        await ctx.log(f"thaw failed: {exc}")
            pause_ms = round(paused * 1000, 3)
            await ctx.log(f"the guest was paused for {pause_ms:.1f} ms")
        else:
            await ctx.log(f"snapshot of the stopped VM's {what}")
            await copy_vars()
            for path in paths:
                await qemu_img.snapshot_create(path, snap.tag)
        size = copy.stat().st_size if vars_file else 0
        if snap.with_memory:
            size += await self._vmstate_size(paths[0], snap.tag)
        async with self.ctx.sessions() as session:
            row = await session.get(Snapshot, snap_id)
            if row is None:
                raise JobError("the snapshot's record vanished")
            parent = await session.scalar(
                select(Snapshot.id).where(Snapshot.vm_id == vm.id, Snapshot.is_current.is_(True))
            )
            await session.execute(
                update(Snapshot).where(Snapshot.vm_id == vm.id).values(is_current=False)
            )
            row.parent_id, row.is_current, row.status = parent, True, "ready"
            row.size_bytes, row.pause_ms, row.created_at = size, pause_ms, utcnow()
            message = f"{vm.name}: snapshot {row.name} taken"
            session.add(Event(vm_uuid=vm.uuid, kind="snapshot", message=message))
            await session.commit()
        ctx.commit()
        return {"vm": vm.name, "snapshot": snap.name, "pause_ms": pause_ms, "size_bytes": size}

    async def _vmstate_size(self, first_disk: Path, tag: str) -> int:
        """The size of the RAM and device state saved in the first disk."""
        for entry in await qemu_img.snapshots(first_disk):
            if entry.get("name") == tag:
                return int(entry.get("vm-state-size", 0))
        return 0

    # -- revert -------------------------------------------------------------------

    async def revert(self, vm_name: str, name: str, *, start: bool = False) -> str:
        vm, snap = await self.get(vm_name, name)
        self._check_revert(vm, snap)
        vm_uuid, snap_id = vm.uuid, snap.id

        async def job(ctx: JobContext) -> dict[str, Any]:
            return await self._revert(ctx, vm_uuid, snap_id, start)

        return await self.ctx.runner.submit(
            "snapshot.revert", f"vm:{vm_uuid}", job, params={"name": vm_name, "snapshot": name}
        )

    def _check_revert(self, vm: Vm, snap: Snapshot) -> None:
        check_snapshottable(vm)
        if snap.status not in ("ready", "reverting"):
            raise Conflict(f"snapshot {snap.name} of {vm.name} is {snap.status}")
        now = [d.path for d in vm.disks]
        if now != snap.hardware.get("disks"):
            raise Conflict(
                f"the disks of VM {vm.name} changed since snapshot {snap.name} was taken "
                f"(then: {', '.join(snap.hardware.get('disks', []))}; now: {', '.join(now)}); "
                "put them back as they were to revert"
            )

    async def _revert(
        self, ctx: JobContext, vm_uuid: str, snap_id: int, start: bool
    ) -> dict[str, Any]:
        vm, snap = await self.load(vm_uuid, snap_id)
        try:
            self._check_revert(vm, snap)
        except (Conflict, InvalidRequest) as exc:
            raise JobError(str(exc)) from None
        if self.ctx.driver.is_running(vm.uuid):
            await ctx.log("forcing the VM off: what it did after the snapshot is discarded")
            await self.ctx.driver.kill(vm.uuid)
        # From here on the revert is rolled forward, even after a crash (see recover).
        await self._set(snap_id, status="reverting")
        ctx.commit()
        await self._apply(vm, snap)
        await ctx.log(f"disks and UEFI variables are back at snapshot {snap.name}")
        await ctx.progress(50)
        if snap.with_memory:
            await ctx.log("starting the VM where the snapshot left it (RAM and devices)")
            await self.lifecycle.do_start(ctx, vm.uuid, snapshot=snap.tag)
        elif start:
            await self.lifecycle.do_start(ctx, vm.uuid)
        return {"vm": vm.name, "snapshot": snap.name, "started": snap.with_memory or start}

    async def _apply(self, vm: Vm, snap: Snapshot) -> None:
        """Put a stopped VM's disks, UEFI variables, vCPUs and memory back at `snap`,
        and make it the current snapshot. Idempotent: recovery runs it again."""
        for path in snap.hardware["disks"]:
            await qemu_img.snapshot_apply(Path(path), snap.tag)
        directory = specs.vm_dir(self.ctx.settings, vm)
        copy = vars_copy(directory, snap.tag)
        if copy.exists():
            await asyncio.to_thread(_copy_private, copy, directory / specs.VARS_FILE)
        async with self.ctx.sessions() as session:
            row = await session.get(Vm, vm.id)
            if row is not None:
                row.vcpus = int(snap.hardware["vcpus"])
                row.memory_mib = int(snap.hardware["memory_mib"])
            await session.execute(
                update(Snapshot).where(Snapshot.vm_id == vm.id).values(is_current=False)
            )
            await session.execute(
                update(Snapshot)
                .where(Snapshot.id == snap.id)
                .values(is_current=True, status="ready")
            )
            message = f"{vm.name}: reverted to snapshot {snap.name}"
            session.add(Event(vm_uuid=vm.uuid, kind="snapshot", message=message))
            await session.commit()

    # -- delete -------------------------------------------------------------------

    async def delete(self, vm_name: str, name: str) -> str:
        vm, snap = await self.get(vm_name, name)
        self._check_delete(vm, snap)
        vm_uuid, snap_id = vm.uuid, snap.id

        async def job(ctx: JobContext) -> dict[str, Any]:
            vm, snap = await self.load(vm_uuid, snap_id)
            try:
                self._check_delete(vm, snap)
            except (Conflict, InvalidRequest) as exc:
                raise JobError(str(exc)) from None
            await self.delete_now(ctx, vm, snap)
            return {"vm": vm.name, "snapshot": snap.name}

        return await self.ctx.runner.submit(
            "snapshot.delete", f"vm:{vm_uuid}", job, params={"name": vm_name, "snapshot": name}
        )

    def _check_delete(self, vm: Vm, snap: Snapshot) -> None:
        if vm.is_template:
            raise Conflict(f"VM {vm.name} is a template: its disks are read-only")
        if snap.status == "creating":
            raise Conflict(f"snapshot {snap.name} of {vm.name} is still being taken")

    async def delete_now(self, ctx: JobContext, vm: Vm, snap: Snapshot) -> None:
        """Delete a snapshot under the VM's lock; rolled forward once begun."""
        await self._set(snap.id, status="deleting")
        ctx.commit()
        await self._finish_delete(vm, snap)
        await ctx.log(f"snapshot {snap.name} deleted; the others are unchanged")

    async def _finish_delete(self, vm: Vm, snap: Snapshot) -> None:
        paths = [Path(p) for p in snap.hardware.get("disks", [])]
        await self._remove_tag(vm, snap.tag, paths, repair=False)
        vars_copy(specs.vm_dir(self.ctx.settings, vm), snap.tag).unlink(missing_ok=True)
        async with self.ctx.sessions() as session:
            # Its children now hang from its parent, which also becomes current if it was.
            await session.execute(
                update(Snapshot)
                .where(Snapshot.parent_id == snap.id)
                .values(parent_id=snap.parent_id)
            )
            if snap.is_current and snap.parent_id is not None:
                await session.execute(
                    update(Snapshot).where(Snapshot.id == snap.parent_id).values(is_current=True)
                )
            row = await session.get(Snapshot, snap.id)
            if row is not None:
                await session.delete(row)
            message = f"{vm.name}: snapshot {snap.name} deleted"
            session.add(Event(vm_uuid=vm.uuid, kind="snapshot", message=message))
            await session.commit()

    # -- shared steps ---------------------------------------------------------------

    async def _remove_tag(self, vm: Vm, tag: str, paths: list[Path], *, repair: bool) -> None:
        """Delete internal snapshot `tag` wherever it exists: through QEMU while the VM
        runs, with qemu-img otherwise. `repair` frees the clusters a QEMU killed in
        the middle of writing a snapshot leaked."""
        driver = self.ctx.driver
        if driver.is_running(vm.uuid):
            attached = [d.index for d in vm.disks if Path(d.path) in paths]
            try:
                await driver.delete_snapshot(vm.uuid, tag, attached)
                return
            except DriverError:
                if not await driver.wait_stopped(vm.uuid, STOP_DEADLINE):
                    raise
            # QEMU died under us: the files are free for qemu-img now.
        for path in paths:
            if not path.exists():
                continue
            if any(entry.get("name") == tag for entry in await qemu_img.snapshots(path)):
                await qemu_img.snapshot_delete(path, tag)
            if repair and await qemu_img.check(path, repair_leaks=True) != "clean":
                log.error("disk %s of VM %s is damaged: qemu-img check failed", path, vm.name)

    async def _discard(self, vm_uuid: str, snap_id: int, *, repair: bool) -> None:
        """Undo an unfinished snapshot: its tag in the disks, its files, its row, and the
        pause it may have left (a crash between pausing and resuming the guest)."""
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        async with self.ctx.sessions() as session:
            snap = await session.get(Snapshot, snap_id)
        if vm is None or snap is None:
            return
        paths = [Path(p) for p in snap.hardware.get("disks") or [d.path for d in vm.disks]]
        await self._remove_tag(vm, snap.tag, paths, repair=repair)
        vars_copy(specs.vm_dir(self.ctx.settings, vm), snap.tag).unlink(missing_ok=True)
        await self._delete_row(snap_id)
        running = self.ctx.driver.is_running(vm_uuid)
        if running and snap.vm_state == "running" and vm.state == "paused":
            log.warning("resuming VM %s, paused by the interrupted snapshot", vm.name)
            await self.ctx.driver.resume(vm_uuid)

    async def load(self, vm_uuid: str, snap_id: int) -> tuple[Vm, Snapshot]:
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None:
            raise JobError("the VM no longer exists")
        async with self.ctx.sessions() as session:
            snap = await session.get(Snapshot, snap_id)
        if snap is None:
            raise JobError("the snapshot no longer exists")
        return vm, snap

    async def _set(self, snap_id: int, **values: Any) -> None:
        async with self.ctx.sessions() as session:
            await session.execute(update(Snapshot).where(Snapshot.id == snap_id).values(**values))
            await session.commit()

    async def _delete_row(self, snap_id: int) -> None:
        async with self.ctx.sessions() as session:
            row = await session.get(Snapshot, snap_id)
            if row is not None:
                await session.delete(row)
            await session.commit()

    # -- crash recovery -------------------------------------------------------------

    async def recover(self) -> None:
        """Finish what an earlier daemon left half-done (run after VMs are re-adopted):
        an unfinished snapshot is removed, a revert or a deletion is completed."""
        async with self.ctx.sessions() as session:
            rows = list(
                await session.execute(
                    select(Snapshot, Vm.uuid)
                    .join(Vm, Vm.id == Snapshot.vm_id)
                    .where(Snapshot.status != "ready")
                )
            )
        for snap, vm_uuid in rows:
            try:
                await self._recover_one(snap, vm_uuid)
            except Exception:
                log.exception("recovering snapshot %s failed", snap.name)

    async def _recover_one(self, snap: Snapshot, vm_uuid: str) -> None:
        driver = self.ctx.driver
        if driver.is_running(vm_uuid):
            await driver.settle_snapshot_jobs(vm_uuid)
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None:
            return
        if snap.status == "creating":
            log.warning("removing snapshot %s of %s: it was interrupted", snap.name, vm.name)
            await self._discard(vm_uuid, snap.id, repair=True)
        elif snap.status == "deleting":
            log.warning("finishing the deletion of snapshot %s of %s", snap.name, vm.name)
            await self._finish_delete(vm, snap)
        elif snap.status == "reverting":
            log.warning("finishing the revert of %s to snapshot %s", vm.name, snap.name)
            if driver.is_running(vm_uuid) and vm.state == "running":
                # The RAM was loaded and the guest runs: only the record is behind.
                await self._mark_current(vm, snap)
                return
            await driver.kill(vm_uuid)
            for path in snap.hardware["disks"]:
                await qemu_img.check(Path(path), repair_leaks=True)
            await self._apply(vm, snap)

    async def _mark_current(self, vm: Vm, snap: Snapshot) -> None:
        async with self.ctx.sessions() as session:
            await session.execute(
                update(Snapshot).where(Snapshot.vm_id == vm.id).values(is_current=False)
            )
            await session.execute(
                update(Snapshot)
                .where(Snapshot.id == snap.id)
                .values(is_current=True, status="ready")
            )
            await session.commit()
