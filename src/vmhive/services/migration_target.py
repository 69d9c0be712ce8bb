"""The receiving side of a live migration between nodes (see migrations.py):
the incoming QEMU this node starts for a source node, driven over the
internal API, and made this node's VM at the commit.

The source calls in every half second while it drives a migration (its
`status` poll). Every call renews a lease: an incoming migration whose source
has not called for `LEASE_S` (the network cut, the source daemon dead) is
aborted here on this node's own initiative -- QEMU, new disks and TAPs gone --
unless the guest may already run here (`cont` was sent), which only the
source's commit or its recovery may settle. A migration never committed is
aborted in any case after its deadline (plus a margin).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import select, update

from vmhive.hypervisor.qemu.argv import build_argv
from vmhive.hypervisor.qemu.migration import (
    Endpoint,
    MigrationError,
    MigrationSettings,
    MigrationTarget,
    NewDisk,
    StorageMode,
    incoming_argv,
)
from vmhive.hypervisor.qemu.process import RuntimeRecord, host_boot_id
from vmhive.hypervisor.qemu.qmp import MonitorTimeout, QmpCommandError
from vmhive.services import cloudinit, specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.services.networks import NetworkService
from vmhive.services.nodes import NodeService
from vmhive.services.pools import PoolService
from vmhive.store.models import Disk, Event, Pool, Vm, Volume

log = logging.getLogger(__name__)

EXTS = {"qcow2": "qcow2", "raw": "img"}
LEASE_S = 15.0  # seconds without a call from the source before the target gives up


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class TcpMigrationTarget(MigrationTarget):
    """A MigrationTarget listening on this node's address instead of unix sockets."""

    host = ""
    ports = (0, 0)

    @property
    def migration_endpoint(self) -> Endpoint:
        return Endpoint.tcp(self.host, self.ports[0])

    @property
    def nbd_endpoint(self) -> Endpoint:
        return Endpoint.tcp(self.host, self.ports[1])


@dataclass
class _Incoming:
    vm: Vm
    target: TcpMigrationTarget
    disk_paths: dict[int, str]  # disk index -> its new path here (local storage)
    expiry: asyncio.Task[None] | None = None
    last_call: float = 0.0  # time.monotonic() of the source's last call
    volumes: dict[int, int] = field(default_factory=dict)  # disk index -> volume moving here
    handed_over: bool = False  # `cont` was sent: the guest may run here


class IncomingMigrations:
    """What the target node keeps of the migrations coming to it."""

    def __init__(
        self,
        ctx: ServiceContext,
        networks: NetworkService,
        nodes: NodeService,
        pools: PoolService | None = None,
    ) -> None:
        self.ctx = ctx
        self.networks = networks
        self.nodes = nodes
        self.pools = pools
        self._open: dict[str, _Incoming] = {}
        self._aborted: set[str] = set()  # aborts of migrations not (yet) open

    def _get(self, migration_id: str) -> _Incoming:
        found = self._open.get(migration_id)
        if found is None:
            raise NotFound(f"no incoming migration {migration_id}")
        found.last_call = time.monotonic()
        return found

    async def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start the incoming QEMU. `id` is the source's: an abort that arrives while
        this still runs (the source gave up waiting) is honoured when it ends."""
        migration_id = str(body.get("id", ""))
        if not migration_id or migration_id in self._open:
            raise InvalidRequest("a new migration needs an id of its own")
        answer = await self._prepare(migration_id, body)
        if migration_id in self._aborted:
            await self.abort(migration_id)
            raise Conflict("the migration was aborted while its target started")
        return answer

    async def _prepare(self, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        settings = self.ctx.settings
        vm = await self.ctx.load_vm_by_uuid(str(body.get("vm_uuid", "")))
        if vm is None:
            raise NotFound("no such VM")
        if vm.node_id == self.ctx.node_id:
            raise Conflict(f"VM {vm.name} is on this node already")
        for cd in vm.cdroms:
            if cd.iso and not Path(cd.iso).exists():
                raise Conflict(f"{cd.iso} is not on node {self.nodes.name}: eject it first")
        storage = StorageMode(body["storage"])
        mirrored = {str(entry.get("node")) for entry in body.get("disks", [])}
        for disk in vm.disks:  # the disks not copied are opened where they are
            if f"disk{disk.index}" not in mirrored and not Path(disk.path).exists():
                raise Conflict(
                    f"{disk.path} is not on node {self.nodes.name}: "
                    "its shared pool is not mounted there"
                )
        volumes = await self._volume_paths(vm, mirrored)
        folder = specs.vm_dir(settings, vm)
        folder.mkdir(parents=True, exist_ok=True)
        new_disks: list[NewDisk] = []
        paths: dict[int, str] = {}
        for entry in body.get("disks", []):
            node, fmt, size = str(entry["node"]), str(entry["format"]), int(entry["size"])
            if node == "fw-vars":
                path = folder / specs.VARS_FILE
            elif node.startswith("disk") and node[4:].isdigit():
                index = int(node[4:])
                path = (
                    volumes[index][1]
                    if index in volumes
                    else (folder / f"migrated-disk{index}.{EXTS.get(fmt, fmt)}")
                )
                paths[index] = str(path)
            else:
                raise InvalidRequest(f"unknown block node {node!r}")
            new_disks.append(NewDisk(node=node, path=path, format=fmt, size=size))
        for disk in vm.disks:  # the spec is built with the new paths (not stored yet)
            if disk.index in paths:
                disk.path = paths[disk.index]
        if vm.cloudinit:
            await cloudinit.write_seed(settings, vm)
        spec = specs.build_spec(settings, vm, self.ctx.host.accel.accel)
        host = (settings.node_address or settings.listen).rpartition(":")[0].strip("[]")
        await self.networks.plug(vm)
        try:
            target = cast(
                TcpMigrationTarget, await TcpMigrationTarget.launch(spec, new_disks=new_disks)
            )
        except MigrationError as exc:
            await self.networks.unplug(vm.uuid)
            raise Conflict(f"node {self.nodes.name} cannot start the VM: {exc}") from None
        target.host = host
        target.ports = (_free_port(host), _free_port(host))
        migration_id = str(body["id"])
        moving = {index: volume_id for index, (volume_id, _) in volumes.items()}
        incoming = _Incoming(vm, target, paths, last_call=time.monotonic(), volumes=moving)
        self._open[migration_id] = incoming
        deadline = float(body.get("deadline_s", 3600)) + 120
        incoming.expiry = asyncio.create_task(self._expire(migration_id, deadline))
        log.info("incoming migration %s of VM %s (%s storage)", migration_id, vm.name, storage)
        return {
            "id": migration_id,
            "migration": {"host": host, "port": target.ports[0]},
            "nbd": {"host": host, "port": target.ports[1]},
        }

    async def _volume_paths(self, vm: Vm, mirrored: set[str]) -> dict[int, tuple[int, Path]]:
        """Volumes of a local pool among the disks to copy: each goes to the same pool
        here, under its name (disk index -> volume id, its path here)."""
        wanted = {d.volume_id: d.index for d in vm.disks
                  if d.volume_id is not None and f"disk{d.index}" in mirrored}  # fmt: skip
        if not wanted:
            return {}
        async with self.ctx.sessions() as session:
            rows = await session.execute(
                select(Volume, Pool)
                .join(Pool, Volume.pool_id == Pool.id)
                .where(Volume.id.in_(wanted))
            )
            found = [(volume, pool) for volume, pool in rows]
        paths: dict[int, tuple[int, Path]] = {}
        for volume, pool in found:
            if self.pools is None or pool.name not in self.pools.usable:
                raise Conflict(f"pool {pool.name} is not usable on node {self.nodes.name}")
            path = self.pools.driver(pool).volume_path(volume.name, volume.format)
            if path.exists():
                raise Conflict(f"{path} is on node {self.nodes.name} already")
            paths[wanted[volume.id]] = (volume.id, path)
        return paths

    async def _expire(self, migration_id: str, after: float) -> None:
        """Abort the migration once its deadline passed, or once the source stopped
        calling for LEASE_S before the guest could have run here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + after
        while (incoming := self._open.get(migration_id)) is not None:
            silent = time.monotonic() - incoming.last_call
            if loop.time() >= deadline:
                log.warning("incoming migration %s was never committed: aborting it", migration_id)
                await self.abort(migration_id)
                return
            if silent >= LEASE_S and not incoming.handed_over:
                log.warning(
                    "incoming migration %s of VM %s: no word from the source for %.0f s, "
                    "aborting it",
                    migration_id,
                    incoming.vm.name,
                    silent,
                )
                await self.abort(migration_id)
                return
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def op(self, migration_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        target = self._get(migration_id).target
        monitor = target.monitor
        if name == "listen":
            await target.listen(MigrationSettings(**args["settings"]))
        elif name == "export":
            await target.export_disks([str(n) for n in args["nodes"]])
        elif name == "stop-exports":
            await target.stop_exports()
        elif name == "query-migrate":
            return {"reply": await monitor.query_migrate()}
        elif name == "query-status":
            status = await monitor.query_status()
            return {"status": status.status, "running": status.running}
        elif name == "cont":
            incoming = self._get(migration_id)
            incoming.handed_over = True  # from here only a commit or the source decides
            try:
                await monitor.cont()
            except QmpCommandError as exc:
                incoming.handed_over = False
                return {"refused": str(exc)}
        elif name == "wait-event":
            try:
                event = await monitor.wait_event(str(args["name"]), float(args["timeout"]))
            except MonitorTimeout:
                return {"timeout": True}
            return {"name": event.name, "data": event.data, "timestamp": event.timestamp}
        elif name == "status":
            exited = target.process.exited.is_set()
            return {"exited": exited, "reason": target.process.exit_reason() if exited else ""}
        else:
            raise InvalidRequest(f"unknown migration operation {name!r}")
        return {}

    async def commit(self, migration_id: str) -> dict[str, Any]:
        """The guest runs here now: make the QEMU and the VM this node's."""
        incoming = self._open.pop(migration_id, None)
        if incoming is None:
            raise NotFound(f"no incoming migration {migration_id}")
        if incoming.expiry is not None:
            incoming.expiry.cancel()
        target, vm = incoming.target, incoming.vm
        target.commit()
        spec = target.spec
        RuntimeRecord(
            vm_uuid=vm.uuid,
            pid=target.process.pid,
            argv=build_argv(spec) + incoming_argv(),
            boot_id=host_boot_id(),
            started_at=time.time(),
            accel=spec.accel.value,
        ).save(spec.runtime.run_dir)
        await target.close()
        async with self.ctx.sessions() as session:
            await session.execute(
                update(Vm)
                .where(Vm.uuid == vm.uuid)
                .values(node_id=self.ctx.node_id, pid=target.process.pid, accel=spec.accel.value)
            )
            for index, path in incoming.disk_paths.items():
                volume_id = incoming.volumes.get(index)
                if volume_id is not None:  # a volume, here now, whole (no backing file)
                    await session.execute(
                        update(Volume)
                        .where(Volume.id == volume_id)
                        .values(path=path, node_id=self.ctx.node_id, backing_id=None)
                    )
                    await session.execute(
                        update(Disk).where(Disk.vm_id == vm.id, Disk.index == index)
                        .values(path=path)
                    )  # fmt: skip
                    continue
                await session.execute(
                    update(Disk)
                    .where(Disk.vm_id == vm.id, Disk.index == index)
                    .values(path=path, source="copy", base_disk_id=None, image=None)
                )
            message = f"{vm.name}: migrated in to node {self.nodes.name}"
            session.add(Event(vm_uuid=vm.uuid, kind="migrate", message=message))
            await session.commit()
        adopted = await self.ctx.driver.adopt(spec)
        await self.ctx.record_state(vm.uuid, adopted.state.value, "migrated in", desired="running")
        return {"pid": target.process.pid, "node": self.nodes.name}

    async def abort(self, migration_id: str) -> None:
        incoming = self._open.pop(migration_id, None)
        if incoming is None:
            self._aborted.add(migration_id)
            return
        if incoming.expiry is not None and incoming.expiry is not asyncio.current_task():
            incoming.expiry.cancel()
        await incoming.target.abort()
        await self.networks.unplug(incoming.vm.uuid)
