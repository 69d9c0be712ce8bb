"""Templates, and linked or full clones of them (or of stopped VMs)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import uuid as uuidlib
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from vmhive.hypervisor.base import DriverError
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, ServiceError
from vmhive.services.lifecycle import Lifecycle
from vmhive.services.snapshots import snapshot_source
from vmhive.storage import qemu_img
from vmhive.store.models import Cdrom, Disk, Event, Nic, Vm

READ_ONLY = stat.S_IRUSR | stat.S_IRGRP


class TemplateService:
    def __init__(self, ctx: ServiceContext, lifecycle: Lifecycle) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle

    async def make_template(self, name: str) -> str:
        """Turn a stopped VM into a template: read-only disks, never started again."""
        vm = await self.ctx.load_vm(name)
        if vm.is_template:
            raise Conflict(f"VM {name} is already a template")
        if vm.state not in ("stopped", "crashed") or self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {name} must be stopped to become a template (it is {vm.state})")
        if any(d.volume_id is not None for d in vm.disks):
            raise InvalidRequest(
                f"detach the pool volumes of {name} first: templates own their disks"
            )
        vm_uuid = vm.uuid
        paths = [Path(d.path) for d in vm.disks]

        async def job(ctx: JobContext) -> dict[str, Any]:
            # Read-only on disk too: a linked clone's base must never change.
            for path in paths:
                os.chmod(path, READ_ONLY)
            async with self.ctx.sessions() as session:
                row = await self.ctx.find_vm(session, name)
                row.is_template = True
                row.autostart = False
                session.add(Event(vm_uuid=vm_uuid, kind="template", message=f"{name}: template"))
                await session.commit()
            await ctx.log(f"{name} is now a template; its disks are read-only")
            return {"vm": name}

        return await self.ctx.runner.submit(
            "vm.template", f"vm:{vm_uuid}", job, params={"name": name}
        )

    async def clone(
        self,
        source: str,
        name: str,
        *,
        linked: bool | None = None,
        start: bool = False,
        snapshot: str | None = None,
    ) -> str:
        """A new VM from a template (linked or full) or from a stopped VM (full); with
        `snapshot`, a full copy of the source as that snapshot of it holds it."""
        specs.check_name(name)
        src = await self.ctx.load_vm(source)
        origin = None
        if snapshot is not None:
            if linked:
                raise InvalidRequest("a clone from a snapshot is a full copy: drop --linked")
            origin = await snapshot_source(self.ctx, src, snapshot)
            linked = False
        if linked is None:
            linked = src.is_template
        if linked and not src.is_template:
            raise InvalidRequest(
                f"a linked clone needs a template: run `vmhive vm template {source}` first, or use --full"
            )
        live = origin is None and not src.is_template and self.ctx.driver.is_running(src.uuid)
        if live and src.state != "running":
            raise Conflict(f"VM {source} is {src.state}: clone it running or stopped")
        if origin is None and not live and src.state not in ("stopped", "crashed", "running"):
            raise Conflict(f"VM {source} is {src.state}: clone it running or stopped")
        if any(d.volume_id is not None for d in src.disks):
            raise InvalidRequest(
                f"VM {source} has pool volumes attached: cloning those is not supported yet"
            )

        new_uuid = str(uuidlib.uuid4())
        directory = self.ctx.settings.vms_dir / new_uuid
        async with self.ctx.sessions() as session:
            taken = set(await session.scalars(select(Nic.mac)))
            vm = Vm(
                uuid=new_uuid,
                name=name,
                description=f"clone of {source}" + (f" at snapshot {snapshot}" if snapshot else ""),
                generation=src.generation,
                vcpus=origin.vcpus if origin else src.vcpus,
                memory_mib=origin.memory_mib if origin else src.memory_mib,
                machine=src.machine,
                boot_order=src.boot_order,
                kernel=src.kernel,
                initrd=src.initrd,
                cmdline=src.cmdline,
                desired_state="stopped",
                state="creating",
                # A new instance id: cloud-init treats the clone as a new machine.
                cloudinit=src.cloudinit,
                cloudinit_instance_id=str(uuidlib.uuid4()),
                cloudinit_config=src.cloudinit_config,
                node_id=self.ctx.node_id,
            )
            for cd in src.cdroms:
                vm.cdroms.append(Cdrom(index=cd.index, iso=cd.iso))
            for nic in src.nics:
                mac = specs.random_mac(taken)
                taken.add(mac)
                vm.nics.append(
                    Nic(
                        index=nic.index,
                        mac=mac,
                        model=nic.model,
                        backend=nic.backend,
                        network_id=nic.network_id,
                        vlan=nic.vlan,
                        link_up=nic.link_up,
                    )  # a fixed address stays with the source
                )
            session.add(vm)
            session.add(
                Event(
                    vm_uuid=new_uuid,
                    kind="create",
                    message=f"{name}: cloned from {source}"
                    + (f" at snapshot {snapshot}" if snapshot else ""),
                )
            )
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"a VM named {name!r} already exists") from None
        disks: list[tuple[int | None, int, Path, str, int]] = [
            (d.id, d.index, Path(d.path), d.format, d.size_bytes) for d in src.disks
        ]
        if origin is not None:
            disks = [(None, index, path, "qcow2", 0) for index, path in enumerate(origin.disks)]
        src_uuid = src.uuid
        src_vars: Path | None = specs.vm_dir(self.ctx.settings, src) / specs.VARS_FILE
        if origin is not None:
            src_vars = origin.vars_file

        async def job(ctx: JobContext) -> dict[str, Any]:
            async def remove() -> None:
                await self.ctx.discard_vm(new_uuid)

            ctx.on_rollback(f"remove the half-made clone {name}", remove)
            if snapshot is not None:
                try:  # the source's lock is held: it cannot go away from here on
                    await snapshot_source(self.ctx, src, snapshot)
                except ServiceError as exc:
                    raise JobError(str(exc)) from None
            directory.mkdir(parents=True)
            rows = []
            if live:
                await self._copy_live(ctx, src_uuid, disks, directory)
            for n, (disk_id, index, path, fmt, size) in enumerate(disks):
                dest = directory / f"disk{index}.qcow2"
                if live:
                    pass  # copied above, all disks at one point in time
                elif linked:
                    await ctx.log(f"disk{index}: overlay on template disk {path}")
                    await qemu_img.create_overlay(dest, path, fmt, None)
                elif origin is not None:
                    await ctx.log(f"disk{index}: full copy of {path} at snapshot {snapshot}")
                    share = 90 // max(1, len(disks))

                    async def report_snapshot(
                        p: int, base: int = n * share, span: int = share
                    ) -> None:
                        await ctx.progress(base + p * span // 100)

                    await qemu_img.convert_snapshot(path, origin.tag, dest, report_snapshot)
                    size = int((await qemu_img.info(dest, "qcow2"))["virtual-size"])
                else:
                    await ctx.log(f"disk{index}: full copy of {path}")
                    share = 90 // max(1, len(disks))

                    async def report(p: int, base: int = n * share, span: int = share) -> None:
                        await ctx.progress(base + p * span // 100)

                    await qemu_img.convert(path, fmt, dest, "qcow2", progress=report)
                rows.append(
                    Disk(
                        index=index,
                        path=str(dest),
                        format="qcow2",
                        size_bytes=size,
                        source="linked" if linked else "copy",
                        image=source,
                        base_disk_id=disk_id if linked else None,
                    )
                )
            if src_vars is not None and src_vars.exists():
                await ctx.log("UEFI: the clone's own copy of the firmware variables")
                await asyncio.to_thread(shutil.copyfile, src_vars, directory / specs.VARS_FILE)
                os.chmod(directory / specs.VARS_FILE, 0o600)
            async with self.ctx.sessions() as session:
                row = await session.scalar(select(Vm).where(Vm.uuid == new_uuid))
                if row is None:
                    raise JobError("the clone vanished while it was being made")
                row.disks.extend(rows)
                row.state = "stopped"
                await session.commit()
            ctx.commit()
            if start:
                await self.lifecycle.do_start(ctx, new_uuid)
            return {"vm": name, "uuid": new_uuid, "linked": linked, "live": live}

        # A clone from a snapshot holds the source's lock: the snapshot stays while it is read.
        target = f"vm:{src_uuid}" if origin is not None else f"vm:{new_uuid}"
        return await self.ctx.runner.submit(
            "vm.clone", target, job, params={"name": name, "source": source}
        )

    async def _copy_live(
        self,
        ctx: JobContext,
        src_uuid: str,
        disks: list[tuple[int | None, int, Path, str, int]],
        directory: Path,
    ) -> None:
        """Full copies of a running VM's disks (QEMU mirror jobs), the guest running on."""
        targets = []
        for _, index, path, fmt, _ in disks:
            dest = directory / f"disk{index}.qcow2"
            size = int((await qemu_img.info(path, fmt))["virtual-size"])
            await qemu_img.create_blank(dest, size)
            targets.append((index, dest))
        await ctx.log(f"copying {len(targets)} disk(s) of the running VM (mirror jobs)")

        async def report(percent: int) -> None:
            await ctx.progress(percent * 90 // 100)

        try:
            await self.ctx.driver.copy_disks_live(src_uuid, targets, report)
        except DriverError as exc:
            raise JobError(str(exc)) from exc
        await ctx.log("copies in sync; ended at one point in time across all disks")
