"""Storage pools and volumes: create, list, resize, delete, import, attach, detach."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vmhive.hypervisor.base import DriverError
from vmhive.hypervisor.qemu.argv import validate_spec
from vmhive.hypervisor.spec import DiskSpec
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import imports, specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.services.pools import PoolService
from vmhive.storage import qemu_img
from vmhive.storage.pools import PoolDriver, VolumeSizes
from vmhive.store.models import Disk, Node, Pool, Vm, Volume

VOLUME_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
VOLUME_FORMATS = ("qcow2", "raw")
MAX_VOLUME_BYTES = 64 * 1024**4


@dataclass
class VolumeView:
    volume: Volume
    sizes: VolumeSizes
    attached_to: list[str]
    backing: str | None
    node: str | None = None  # the node holding it, in a local pool


def check_volume_name(name: str) -> None:
    if not VOLUME_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid volume name {name!r}: use lower-case letters, digits, '.', '_' and '-'"
        )


def check_size(size: int) -> None:
    if not 1024 * 1024 <= size <= MAX_VOLUME_BYTES:
        raise InvalidRequest("volume size must be between 1 MiB and 64 TiB")


async def _node_name(session: AsyncSession, node_id: int | None) -> str | None:
    """The name of the node holding a volume of a local pool (None: a shared pool)."""
    if node_id is None:
        return None
    name: str | None = await session.scalar(select(Node.name).where(Node.id == node_id))
    return name


class VolumeService:
    def __init__(self, ctx: ServiceContext, pools: PoolService) -> None:
        self.ctx = ctx
        self.pools = pools

    async def _pool(self, session: AsyncSession, name: str) -> Pool:
        pool = await session.scalar(select(Pool).where(Pool.name == name))
        if pool is None:
            raise NotFound(f"no storage pool named {name!r}")
        return pool

    def _driver(self, pool: Pool) -> PoolDriver:
        return self.pools.driver(pool)

    # -- reading ------------------------------------------------------------------

    async def _volume(self, session: AsyncSession, pool_name: str, name: str) -> Volume:
        """A volume this node holds (any volume of a shared pool, its own of a local one)."""
        pool = await self._pool(session, pool_name)
        volume = await session.scalar(
            select(Volume).where(Volume.pool_id == pool.id, Volume.name == name)
        )
        if volume is None:
            raise NotFound(f"no volume {name!r} in pool {pool_name!r}")
        if volume.node_id is not None and volume.node_id != self.ctx.node_id:
            node = await _node_name(session, volume.node_id)
            raise Conflict(
                f"volume {pool_name}/{name} is on node {node}: "
                f"pool {pool_name} is local to each node, ask node {node}"
            )
        return volume

    async def _users(self, session: AsyncSession, volume: Volume) -> tuple[list[str], list[str]]:
        """VMs the volume is attached to, and volumes or VM disks built on it."""
        attached = list(
            await session.scalars(
                select(Vm.name).join(Disk, Disk.vm_id == Vm.id).where(Disk.volume_id == volume.id)
            )
        )
        children = list(
            await session.scalars(select(Volume.name).where(Volume.backing_id == volume.id))
        )
        return attached, children

    async def _view(self, session: AsyncSession, volume: Volume) -> VolumeView:
        attached, _children = await self._users(session, volume)
        backing = None
        if volume.backing_id is not None:
            parent = await session.get(Volume, volume.backing_id)
            backing = f"{parent.pool.name}/{parent.name}" if parent else None
        sizes = VolumeSizes(volume.virtual_size, 0)  # another node's file is not read
        node = await _node_name(session, volume.node_id)
        if volume.node_id in (None, self.ctx.node_id):
            with contextlib.suppress(qemu_img.QemuImgError):
                sizes = await self._driver(volume.pool).sizes(Path(volume.path), volume.format)
        return VolumeView(volume, sizes, attached, backing, node)

    async def list(self, pool_name: str | None = None) -> list[VolumeView]:
        async with self.ctx.sessions() as session:
            query = select(Volume).join(Pool).order_by(Pool.name, Volume.name)
            if pool_name is not None:
                query = query.where(Volume.pool_id == (await self._pool(session, pool_name)).id)
            return [await self._view(session, v) for v in await session.scalars(query)]

    async def show(self, pool_name: str, name: str) -> VolumeView:
        async with self.ctx.sessions() as session:
            return await self._view(session, await self._volume(session, pool_name, name))

    # -- create, resize, delete -----------------------------------------------------

    async def create(self, pool_name: str, name: str, size: int, fmt: str = "qcow2") -> str:
        check_volume_name(name)
        check_size(size)
        if fmt not in VOLUME_FORMATS:
            raise InvalidRequest(f"volume format must be one of {', '.join(VOLUME_FORMATS)}")
        driver, path, volume_id = await self._reserve(pool_name, name, fmt, size)

        async def job(ctx: JobContext) -> dict[str, Any]:
            self._undo_on_failure(ctx, driver, path, volume_id, f"the half-created volume {name}")
            await ctx.log(f"creating a {fmt} volume of {size} bytes at {path}")
            await driver.create(name, size, fmt)
            return {"pool": pool_name, "volume": name, "path": str(path)}

        return await self.ctx.runner.submit(
            "volume.create", f"volume:{volume_id}", job, params={"name": f"{pool_name}/{name}"}
        )

    async def _reserve(
        self, pool_name: str, name: str, fmt: str, size: int
    ) -> tuple[PoolDriver, Path, int]:
        """Record a new volume (so the name is taken at once); its file comes in the job."""
        async with self.ctx.sessions() as session:
            pool = await self._pool(session, pool_name)
            if pool.name not in self.pools.usable:
                raise Conflict(f"pool {pool_name} is not usable on this node (see `pool list`)")
            driver = self._driver(pool)
            path = driver.volume_path(name, fmt)
            node_id = None if pool.shared else self.ctx.node_id
            volume = Volume(pool_id=pool.id, name=name, format=fmt, path=str(path),
                            virtual_size=size, node_id=node_id)  # fmt: skip
            session.add(volume)
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"pool {pool_name} already has a volume {name!r}") from None
            return driver, path, volume.id

    def _undo_on_failure(
        self, ctx: JobContext, driver: PoolDriver, path: Path, volume_id: int, what: str
    ) -> None:
        async def forget() -> None:
            await driver.delete(path)
            await self._forget(volume_id)

        ctx.on_rollback(f"remove {what}", forget)

    async def discard_unfinished(self, volume_id: int) -> None:
        """Remove a volume whose create or import job was interrupted."""
        async with self.ctx.sessions() as session:
            volume = await session.get(Volume, volume_id)
            if volume is None:
                return
            path, driver = Path(volume.path), self._driver(volume.pool)
        await driver.delete(path)
        await self._forget(volume_id)

    async def _forget(self, volume_id: int) -> None:
        async with self.ctx.sessions() as session:
            volume = await session.get(Volume, volume_id)
            if volume is not None:
                await session.delete(volume)
                await session.commit()

    async def resize(self, pool_name: str, name: str, size: int) -> str:
        """Grow a volume; online (QMP block_resize) when a running VM uses it."""
        check_size(size)
        async with self.ctx.sessions() as session:
            volume = await self._volume(session, pool_name, name)
            if size < volume.virtual_size:
                raise InvalidRequest(
                    f"volumes only grow: {size} is smaller than the current {volume.virtual_size} "
                    "bytes (shrinking would cut off the guest's data)"
                )
            disk = await session.scalar(select(Disk).where(Disk.volume_id == volume.id))
            vm = await session.get(Vm, disk.vm_id) if disk else None
            volume_id, path, fmt, pool = volume.id, Path(volume.path), volume.format, volume.pool

        async def job(ctx: JobContext) -> dict[str, Any]:
            if vm is not None and disk is not None and self.ctx.driver.is_running(vm.uuid):
                await ctx.log(f"growing disk{disk.index} of running VM {vm.name} to {size} bytes")
                await self.ctx.driver.block_resize(vm.uuid, f"disk{disk.index}", size)
            else:
                await ctx.log(f"growing {path} to {size} bytes")
                await self._driver(pool).resize(path, size, fmt)
            async with self.ctx.sessions() as session:
                row = await session.get(Volume, volume_id)
                if row is not None:
                    row.virtual_size = size
                if disk is not None:
                    disk_row = await session.get(Disk, disk.id)
                    if disk_row is not None:
                        disk_row.size_bytes = size
                await session.commit()
            return {"pool": pool_name, "volume": name, "size": size}

        target = f"vm:{vm.uuid}" if vm is not None else f"volume:{volume_id}"
        return await self.ctx.runner.submit(
            "volume.resize", target, job, params={"name": f"{pool_name}/{name}", "size": size}
        )

    async def delete(self, pool_name: str, name: str) -> str:
        async with self.ctx.sessions() as session:
            volume = await self._volume(session, pool_name, name)
            attached, children = await self._users(session, volume)
            if attached:
                raise Conflict(
                    f"volume {name} is attached to VM {', '.join(attached)}: detach it first"
                )
            if children:
                raise Conflict(f"volume {name} is the backing file of {', '.join(children)}")
            volume_id, path, pool = volume.id, Path(volume.path), volume.pool

        async def job(ctx: JobContext) -> dict[str, Any]:
            await self._forget(volume_id)
            ctx.commit()
            await self._driver(pool).delete(path)
            await ctx.log(f"removed {path}")
            return {"pool": pool_name, "volume": name}

        return await self.ctx.runner.submit(
            "volume.delete", f"volume:{volume_id}", job, params={"name": f"{pool_name}/{name}"}
        )

    # -- attach and detach -------------------------------------------------------------

    async def attach(self, vm_name: str, pool_name: str, name: str) -> str:
        """Attach a volume as the VM's next disk: hot-plugged into a running gen 2 VM."""
        async with self.ctx.sessions() as session:
            vm = await self.ctx.find_vm(session, vm_name)
            volume = await self._volume(session, pool_name, name)
            attached, _ = await self._users(session, volume)
            if attached:
                raise Conflict(f"volume {name} is already attached to VM {', '.join(attached)}")
            self._check_pluggable(vm, "attach a disk")
            index = max((d.index for d in vm.disks), default=-1) + 1
            # The argv builder knows each generation's controller limits.
            spec = specs.build_spec(self.ctx.settings, vm, "tcg")
            extra = DiskSpec(path=Path(volume.path), format=volume.format)
            try:
                validate_spec(dataclasses.replace(spec, disks=(*spec.disks, extra)))
            except ValueError as exc:
                raise InvalidRequest(f"cannot attach {name} to {vm_name}: {exc}") from None
            vm_uuid, volume_id, size = vm.uuid, volume.id, volume.virtual_size
            path, fmt = Path(volume.path), volume.format

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                row = await self.ctx.find_vm(session, vm_name)
                self._check_pluggable(row, "attach a disk")
                if self.ctx.driver.is_running(vm_uuid):
                    await ctx.log(f"hot-plugging {pool_name}/{name} as disk{index}")
                    try:
                        await self.ctx.driver.hotplug_disk(vm_uuid, index, path, fmt)
                    except DriverError as exc:
                        raise JobError(str(exc)) from exc

                    async def unplug() -> None:
                        await self.ctx.driver.unplug_disk(vm_uuid, index)

                    ctx.on_rollback(f"unplug disk{index}", unplug)
                row.disks.append(
                    Disk(
                        index=index,
                        path=str(path),
                        format=fmt,
                        size_bytes=size,
                        source="volume",
                        volume_id=volume_id,
                    )
                )
                await session.commit()
            await ctx.log(f"attached {pool_name}/{name} as disk{index}")
            return {"vm": vm_name, "disk": index}

        return await self.ctx.runner.submit(
            "vm.disk-attach", f"vm:{vm_uuid}", job, params={"name": vm_name}
        )

    async def detach(self, vm_name: str, pool_name: str, name: str) -> str:
        """Detach a volume (kept in its pool); unplugged from a running gen 2 VM."""
        async with self.ctx.sessions() as session:
            vm = await self.ctx.find_vm(session, vm_name)
            volume = await self._volume(session, pool_name, name)
            disk = next((d for d in vm.disks if d.volume_id == volume.id), None)
            if disk is None:
                raise Conflict(f"volume {pool_name}/{name} is not attached to VM {vm_name}")
            self._check_pluggable(vm, "detach a disk")
            vm_uuid, disk_id, index = vm.uuid, disk.id, disk.index

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                row = await self.ctx.find_vm(session, vm_name)
                self._check_pluggable(row, "detach a disk")
                if self.ctx.driver.is_running(vm_uuid):
                    await ctx.log(f"asking the guest to release disk{index}")
                    try:
                        await self.ctx.driver.unplug_disk(vm_uuid, index)
                    except DriverError as exc:
                        raise JobError(str(exc)) from exc
                target = await session.get(Disk, disk_id)
                if target is not None:
                    await session.delete(target)
                await session.commit()
            await ctx.log(f"detached {pool_name}/{name}")
            return {"vm": vm_name}

        return await self.ctx.runner.submit(
            "vm.disk-detach", f"vm:{vm_uuid}", job, params={"name": vm_name}
        )

    def _check_pluggable(self, vm: Vm, what: str) -> None:
        """Stopped VMs take any change; running ones only gen 2 hot-plug."""
        if vm.is_template:
            raise Conflict(f"VM {vm.name} is a template: its disks cannot change")
        running = self.ctx.driver.is_running(vm.uuid)
        if running and vm.generation == 1:
            raise Conflict(
                f"VM {vm.name} must be stopped to {what}: generation 1 (IDE) has no hot-plug"
            )
        if not running and vm.state not in ("stopped", "crashed"):
            raise Conflict(f"VM {vm.name} is {vm.state}: try again when it is running or stopped")

    # -- import ---------------------------------------------------------------------

    async def import_file(
        self, pool_name: str, name: str | None, source: str, fmt: str = "auto"
    ) -> str:
        """Convert an image from another hypervisor (a file or a URL) into a qcow2 volume."""
        src = await imports.check_source(self.ctx.settings, source, fmt)
        name = name or src.default_name
        check_volume_name(name)
        size = src.facts.virtual_size if src.facts else 0
        driver, path, volume_id = await self._reserve(pool_name, name, "qcow2", size)

        async def job(ctx: JobContext) -> dict[str, Any]:
            self._undo_on_failure(ctx, driver, path, volume_id, f"the half-imported volume {name}")
            facts = await imports.convert_into(ctx, self.ctx.settings, src, path)
            if facts.virtual_size != size:
                async with self.ctx.sessions() as session:
                    volume = await session.get(Volume, volume_id)
                    if volume is not None:
                        volume.virtual_size = facts.virtual_size
                        await session.commit()
            return {"pool": pool_name, "volume": name, "path": str(path)}

        return await self.ctx.runner.submit(
            "volume.import",
            f"volume:{volume_id}",
            job,
            params={"name": f"{pool_name}/{name}"},
            cancellable=True,
        )
