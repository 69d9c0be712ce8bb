"""What every service shares: settings, database, driver, job runner, host facts."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import joinedload

from vmhive.config import Settings
from vmhive.events import EventBus
from vmhive.hypervisor.base import Driver
from vmhive.jobs.runner import JobRunner
from vmhive.services.errors import Conflict, NotFound
from vmhive.services.host import HostInfo
from vmhive.store.models import Disk, Event, Vm, utcnow


class NotOwned(Conflict):
    """Another node owns the VM."""


@dataclass
class ServiceContext:
    settings: Settings
    sessions: async_sessionmaker[Any]
    driver: Driver
    runner: JobRunner
    host: HostInfo
    events: EventBus = field(default_factory=EventBus)
    node_id: int | None = None  # this daemon's row in `nodes`, once registered

    def here(self) -> ColumnElement[bool]:
        """Filter for the VMs this node owns: the only ones it may run or watch."""
        return Vm.node_id == self.node_id if self.node_id is not None else true()

    async def claim(self, vm: Vm) -> None:
        """The ownership check before any start: the VM must be this node's (a VM
        without a node becomes this node's). In one statement, so two nodes can
        never both pass it; with request relaying, only a stale node ever fails it."""
        if self.node_id is None:
            return
        async with self.sessions() as session:
            owned = await session.execute(
                update(Vm)
                .where(Vm.uuid == vm.uuid, or_(Vm.node_id == self.node_id, Vm.node_id.is_(None)))
                .values(node_id=self.node_id)
                .returning(Vm.id)
            )
            claimed = owned.one_or_none() is not None
            await session.commit()
        if not claimed:
            raise NotOwned(f"VM {vm.name} belongs to another node: only that node may start it")

    async def find_vm(self, session: AsyncSession, name: str) -> Vm:
        vm = await _one_vm(session, Vm.name == name)
        if vm is None or vm.state == "deleting":
            raise NotFound(f"no VM named {name!r}")
        return vm

    async def load_vm(self, name: str) -> Vm:
        async with self.sessions() as session:
            return await self.find_vm(session, name)

    async def load_vm_by_uuid(self, vm_uuid: str) -> Vm | None:
        async with self.sessions() as session:
            return await _one_vm(session, Vm.uuid == vm_uuid)

    async def discard_vm(self, vm_uuid: str, *, deleted_event: bool = False) -> None:
        """Remove a VM's own files (disks, firmware variables) and its record: its
        folder in the data directory and, for disks made in a pool, `POOL/vms/UUID`.

        Serves the rollback of a half-made VM and the end of a deletion alike;
        safe to run twice.
        """
        folders = {self.settings.vms_dir / vm_uuid}
        async with self.sessions() as session:
            own = await session.scalars(
                select(Disk.path)
                .join(Vm, Disk.vm_id == Vm.id)
                .where(Vm.uuid == vm_uuid, Disk.volume_id.is_(None))
            )
            folders |= {Path(p).parent for p in own if Path(p).parent.name == vm_uuid}
        for folder in folders:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        async with self.sessions() as session:
            vm = await session.scalar(select(Vm).where(Vm.uuid == vm_uuid))
            if vm is not None:
                if deleted_event:
                    message = f"{vm.name}: deleted"
                    session.add(Event(vm_uuid=vm_uuid, kind="delete", message=message))
                await session.delete(vm)
            await session.commit()
        if vm is not None:
            self.events.publish("vm", {"name": vm.name, "uuid": vm_uuid, "deleted": True})

    async def record_state(
        self,
        vm_uuid: str,
        state: str,
        reason: str = "",
        *,
        desired: str | None = None,
        pid: int | bool | None = False,
        accel: str | None = None,
    ) -> None:
        """Store an observed state (and optionally desired state / pid) plus an event.

        `pid=False` leaves the stored PID as it is; None clears it.
        """
        async with self.sessions() as session:
            # Core statements only: this runs on every state change, keep it cheap.
            values: dict[str, Any] = {"state_reason": reason, "updated_at": utcnow()}
            if desired is not None:
                values["desired_state"] = desired
            if pid is not False:
                values["pid"] = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
            if accel is not None:
                values["accel"] = accel
            # Only a real change of state returns a row, and gets an event.
            changed = (
                await session.execute(
                    update(Vm)
                    .where(Vm.uuid == vm_uuid, Vm.state != state)
                    .values(state=state, **values)
                    .returning(Vm.name)
                )
            ).one_or_none()
            if changed is None:
                await session.execute(update(Vm).where(Vm.uuid == vm_uuid).values(**values))
            else:
                message = f"{changed.name}: {state}" + (f" ({reason})" if reason else "")
                session.add(Event(vm_uuid=vm_uuid, kind="state", message=message))
            await session.commit()
        if changed is not None:
            self.events.publish(
                "vm", {"name": changed.name, "uuid": vm_uuid, "state": state, "reason": reason}
            )


async def _one_vm(session: AsyncSession, where: ColumnElement[bool]) -> Vm | None:
    """One VM with its devices, in a single query."""
    query = (
        select(Vm)
        .where(where)
        .options(joinedload(Vm.disks), joinedload(Vm.cdroms), joinedload(Vm.nics))
    )
    return (await session.execute(query)).unique().scalar_one_or_none()
