"""A VM's cloud-init settings and its NoCloud seed CD-ROM.

The seed is written at every start and whenever the settings change; on a
running VM the new seed is swapped into the seed drive (QMP
blockdev-change-medium), so a guest that re-reads it sees the new settings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmhive.config import Settings
from vmhive.hypervisor.base import DriverError
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest
from vmhive.storage import cloudinit
from vmhive.storage.cloudinit import CloudInitConfig, CloudInitError, IpConfig, Seed
from vmhive.store.models import Event, Vm


def config_of(vm: Vm) -> CloudInitConfig:
    return CloudInitConfig.from_json(vm.cloudinit_config)


def seed_of(vm: Vm) -> Seed:
    return cloudinit.render(
        config_of(vm),
        base_id=vm.cloudinit_instance_id or vm.uuid,
        vm_name=vm.name,
        macs=[n.mac for n in vm.nics],
    )


def seed_path(settings: Settings, vm: Vm) -> Path:
    return specs.vm_dir(settings, vm) / specs.SEED_FILE


async def write_seed(settings: Settings, vm: Vm) -> Path:
    path = seed_path(settings, vm)
    await asyncio.to_thread(cloudinit.write_seed_iso, path, seed_of(vm))
    return path


def check(config: CloudInitConfig, nics: int) -> CloudInitConfig:
    try:
        cloudinit.validate(config, nics)
    except CloudInitError as exc:
        raise InvalidRequest(f"cloud-init: {exc}") from None
    return config


class CloudInitService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def show(self, name: str) -> dict[str, Any]:
        vm = await self.ctx.load_vm(name)
        seed = seed_of(vm) if vm.cloudinit else None
        config = config_of(vm)
        settings = config.to_json()
        # As PUT takes them: one ipconfig text per NIC, in NIC order.
        by_nic = {ip.nic: ip for ip in config.ipconfig}
        settings["ipconfig"] = [
            cloudinit.format_ipconfig(by_nic.get(nic, IpConfig(nic=nic)))
            for nic in range(max(by_nic, default=-1) + 1)
        ]
        return {
            "enabled": vm.cloudinit,
            "settings": settings,
            "instance_id": seed.instance_id if seed else None,
            "files": seed.files if seed else {},
        }

    async def set(self, name: str, config: CloudInitConfig) -> str:
        """Replace the VM's cloud-init settings (enabling cloud-init) and rewrite its seed."""
        vm = await self.ctx.load_vm(name)
        check(config, len(vm.nics))
        if vm.is_template:
            raise Conflict(f"VM {name} is a template: clones take their settings from it")
        running = self.ctx.driver.is_running(vm.uuid)
        if running and not vm.cloudinit:
            raise Conflict(f"VM {name} has no cloud-init drive while it runs: stop it first")
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                row = await session.scalar(select(Vm).where(Vm.uuid == vm_uuid))
                if row is None:
                    raise JobError(f"VM {name} no longer exists")
                previous = (row.cloudinit, row.cloudinit_config)
                row.cloudinit, row.cloudinit_config = True, config.to_json()
                session.add(Event(vm_uuid=vm_uuid, kind="edit", message=f"{name}: cloud-init set"))
                await session.commit()

            async def restore() -> None:
                async with self.ctx.sessions() as session:
                    row = await session.scalar(select(Vm).where(Vm.uuid == vm_uuid))
                    if row is not None:
                        row.cloudinit, row.cloudinit_config = previous
                        await session.commit()

            ctx.on_rollback("restore the previous cloud-init settings", restore)
            fresh = await self.ctx.load_vm_by_uuid(vm_uuid)
            assert fresh is not None
            path = await write_seed(self.ctx.settings, fresh)
            await ctx.log(f"seed rewritten: instance-id {seed_of(fresh).instance_id}")
            if self.ctx.driver.is_running(vm_uuid):
                try:
                    await self.ctx.driver.insert_media(vm_uuid, len(fresh.cdroms), path)
                except DriverError as exc:
                    raise JobError(f"could not swap the seed in the running VM: {exc}") from exc
                await ctx.log("the running VM's seed drive now holds the new seed")
            return {"vm": name, "instance_id": seed_of(fresh).instance_id}

        return await self.ctx.runner.submit(
            "vm.cloud-init", f"vm:{vm_uuid}", job, params={"name": name}
        )

    async def disable(self, name: str) -> str:
        """Remove the seed drive (the VM must be stopped); the settings are kept."""
        vm = await self.ctx.load_vm(name)
        if self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {name} is running: stop it to remove its cloud-init drive")
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.ctx.driver.is_running(vm_uuid):
                raise JobError(f"VM {name} is running: stop it to remove its cloud-init drive")
            async with self.ctx.sessions() as session:
                row = await session.scalar(select(Vm).where(Vm.uuid == vm_uuid))
                if row is None:
                    raise JobError(f"VM {name} no longer exists")
                row.cloudinit = False
                await session.commit()
                seed_path(self.ctx.settings, row).unlink(missing_ok=True)
            await ctx.log("cloud-init drive removed")
            return {"vm": name}

        return await self.ctx.runner.submit(
            "vm.cloud-init", f"vm:{vm_uuid}", job, params={"name": name}
        )
