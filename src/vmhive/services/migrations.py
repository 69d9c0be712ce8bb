"""Live migration of a running VM to another node (`vmhive vm migrate VM --to NODE`).

The owning node (the source) runs the job and the engine
(`hypervisor/qemu/migration`); the target node runs the incoming QEMU and is
driven over its internal API (`/api/internal/migrations`, cluster secret
only) through `RemoteTarget`, which offers the engine the same interface as a
local `MigrationTarget`. The sequence:

1. Source: checks (running, target online and not drained, room there), then
   asks the target to *prepare*: it writes the VM's cloud-init seed, plugs its
   TAPs, creates empty disk files (local storage) and starts QEMU waiting for
   the incoming state on TCP at its node address; it answers with the
   migration and NBD endpoints.
2. Source: the engine mirrors the disks over NBD, moves RAM and device state,
   switches over and `cont`s the target.
3. Source: asks the target to *commit*: it records the QEMU as the VM's
   (runtime record, driver adoption, serial console), makes the VM its own in
   the database (owner, disk paths) and the source's QEMU quits silently; the
   source removes its now unused TAPs and local disk files.

Any failure before the switchover rolls back (the engine aborts the target:
QEMU, disks, TAPs gone) and the guest runs on the source as before. A target
the source stops calling (a network cut, the source daemon dead) aborts
itself after 15 s unless it may already run the guest, and one never
committed aborts after the migration's deadline (migration_target.py).

Storage: a disk in a shared pool (the same storage at the same path on every
node that sees the pool) stays where it is, and the target opens the same file;
every other disk, and the UEFI variables of a gen 2 VM, is local to this node
and is mirrored. A VM with nothing to mirror moves only its RAM and device
state. A volume of a local pool does not move (it belongs to its node's pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, update

from vmhive.hypervisor.qemu.migration import (
    Endpoint,
    MigrationError,
    MigrationProgress,
    MigrationSettings,
    StorageMode,
)
from vmhive.hypervisor.qemu.qmp import MonitorTimeout, QmpCommandError, QmpEvent, RunStatus
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, NotFound
from vmhive.services.migration_target import IncomingMigrations
from vmhive.services.networks import NetworkService
from vmhive.services.nodes import NodeAddress, NodeService, NodeView
from vmhive.services.placement import Demand, refusal
from vmhive.services.pools import PoolService
from vmhive.store.models import Event, Job, Node, Vm
from vmhive.tasks import spawn

log = logging.getLogger(__name__)

INTERNAL = "/api/internal/migrations"
POLL = 0.5  # seconds between checks that the target QEMU still lives
UNREACHABLE_S = 8.0  # without an answer from the target node: as good as gone
# -- the source node: the target on another node, as the engine sees it --------


class _RemoteProcess:
    def __init__(self) -> None:
        self.exited = asyncio.Event()
        self.reason = ""

    def exit_reason(self) -> str:
        return self.reason or "the target node reported it gone"


class _RemoteMonitor:
    def __init__(self, target: RemoteTarget) -> None:
        self.target = target

    async def query_migrate(self) -> dict[str, Any]:
        reply: dict[str, Any] = (await self.target.call("query-migrate"))["reply"]
        return reply

    async def query_status(self) -> RunStatus:
        answer = await self.target.call("query-status")
        return RunStatus(status=answer["status"], running=answer["running"])

    async def cont(self) -> None:
        answer = await self.target.call("cont")
        if "refused" in answer:
            raise QmpCommandError("cont", "GenericError", answer["refused"])

    async def wait_event(self, name: str, timeout: float) -> QmpEvent:
        answer = await self.target.call(
            "wait-event", {"name": name, "timeout": timeout}, timeout=timeout + 10
        )
        if answer.get("timeout"):
            raise MonitorTimeout(f"no {name} event from the target within {timeout:.0f} s")
        return QmpEvent(answer["name"], answer["data"], answer["timestamp"])


class RemoteTarget:
    """The incoming QEMU on another node, behind a local MigrationTarget's interface."""

    def __init__(
        self, client: httpx.AsyncClient, base: str, answer: dict[str, Any], node: str = ""
    ) -> None:
        self.client = client
        self.node = node
        self.url = f"{base}{INTERNAL}/{answer['id']}"
        self.migration_endpoint = Endpoint.tcp(
            answer["migration"]["host"], answer["migration"]["port"]
        )
        self.nbd_endpoint = Endpoint.tcp(answer["nbd"]["host"], answer["nbd"]["port"])
        self.monitor = _RemoteMonitor(self)
        self.process = _RemoteProcess()
        self.committed = False
        self._watch = asyncio.create_task(self._watch_exit())

    async def call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        try:
            response = await self.client.post(f"{self.url}/{op}", json=args or {}, timeout=timeout)
        except httpx.HTTPError as exc:
            raise MigrationError(f"the target node did not answer: {exc}") from exc
        if response.status_code >= 400:
            raise MigrationError(f"the target node refused {op}: {_detail(response)}")
        answer: dict[str, Any] = response.json()
        return answer

    async def _watch_exit(self) -> None:
        answered = time.monotonic()
        while not self.process.exited.is_set():
            await asyncio.sleep(POLL)
            try:
                status = await self.call("status", timeout=3)
            except MigrationError as exc:
                silent = time.monotonic() - answered
                if silent >= UNREACHABLE_S:
                    self.process.reason = f"node {self.node} unreachable for {silent:.0f} s ({exc})"
                    self.process.exited.set()
                continue
            answered = time.monotonic()
            if status["exited"]:
                self.process.reason = status["reason"]
                self.process.exited.set()

    async def listen(self, settings: MigrationSettings) -> None:
        await self.call("listen", {"settings": asdict(settings)})

    async def export_disks(self, nodes: list[str]) -> None:
        await self.call("export", {"nodes": list(nodes)})

    async def stop_exports(self) -> None:
        await self.call("stop-exports")

    def commit(self) -> None:
        self.committed = True

    async def abort(self) -> None:
        """Tell the target to tear down; brief, as the engine's rollback waits for it
        (a target that cannot be told clears up by itself, its lease run out)."""
        self._watch.cancel()
        with contextlib.suppress(httpx.HTTPError):
            await self.client.delete(self.url, timeout=10)

    async def close(self) -> None:
        self._watch.cancel()


def _remove_copied(folder: Path, vm_uuid: str, disks: list[Path]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for path in disks:
        path.unlink(missing_ok=True)
        if path.parent.name == vm_uuid:  # POOL/vms/UUID
            shutil.rmtree(path.parent, ignore_errors=True)


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text.strip()[:200]


class MigrationService:
    def __init__(
        self,
        ctx: ServiceContext,
        networks: NetworkService,
        nodes: NodeService,
        incoming: IncomingMigrations,
        pools: PoolService,
    ) -> None:
        self.ctx = ctx
        self.networks = networks
        self.nodes = nodes
        self.incoming = incoming
        self.pools = pools

    async def to_mirror(self, vm: Vm, target: NodeView) -> list[str]:
        """The block nodes to copy to `target`: every disk outside the shared pools
        (volumes of a local pool too: they move to the same pool there), and the
        UEFI variables. Refuses a shared pool the target does not see."""
        shared = await self.pools.shared_paths()
        mirror: list[str] = []
        needed: set[str] = set()
        for disk in sorted(vm.disks, key=lambda d: d.index):
            path = Path(disk.path)
            pool = next((name for name, root in shared.items() if path.is_relative_to(root)), None)
            if pool is not None:
                needed.add(pool)
            else:
                mirror.append(f"disk{disk.index}")
        if vm.generation == 2:
            mirror.append("fw-vars")
        missing = sorted(needed - target.pools) if target.pools is not None else []
        if missing:
            raise Conflict(f"node {target.name} does not see shared pool {', '.join(missing)}")
        return mirror

    async def migrate(
        self, name: str, to: str, settings: MigrationSettings, *, offline: bool = False
    ) -> str:
        vm = await self.ctx.load_vm(name)
        if to == self.nodes.name:
            raise Conflict(f"VM {name} is on node {to} already")
        view = await self.nodes.get(to)
        mirror = await self.to_mirror(vm, view)
        if offline:
            return await self._move_stopped(vm, view.name, mirror)
        if vm.state != "running" or not self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {name} is {vm.state}: live migration moves a running VM")
        why = refusal(Demand(vm.vcpus, vm.memory_mib), view.candidate())
        if why is not None:
            raise Conflict(f"node {to} cannot take VM {name}: {why}")
        address = view.reach
        migration_id = secrets.token_hex(8)  # in the job's params, for recovery

        async def job(ctx: JobContext) -> dict[str, Any]:
            return await self._run(ctx, vm, address, settings, migration_id, mirror)

        return await self.ctx.runner.submit(
            "vm.migrate",
            f"vm:{vm.uuid}",
            job,
            params={"name": name, "to": to, "migration_id": migration_id},
            cancellable=True,
        )

    async def _run(
        self,
        ctx: JobContext,
        vm: Vm,
        node: NodeAddress,
        settings: MigrationSettings,
        migration_id: str,
        mirror: list[str],
    ) -> dict[str, Any]:
        driver = self.ctx.driver
        storage = StorageMode.LOCAL if mirror else StorageMode.SHARED
        formats = {f"disk{d.index}": d.format for d in vm.disks} | {"fw-vars": "raw"}
        sizes = await driver.block_node_sizes(vm.uuid) if mirror else {}
        disks = [{"node": n, "format": formats[n], "size": sizes[n]} for n in mirror]
        kept = len(vm.disks) - len([n for n in mirror if n.startswith("disk")])
        copied = f"copying {', '.join(mirror)}" if mirror else "copying no disk"
        await ctx.log(
            f"migrating to node {node.name} ({copied}; {kept} disks in shared pools stay)"
        )
        headers = self.nodes.call_headers()
        base = f"http://{node.address}"
        failed = f"migration failed, {vm.name} runs here as before"
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:

            async def abandon() -> None:  # the target may be starting: it aborts at the end
                with contextlib.suppress(httpx.HTTPError):
                    await client.delete(f"{base}{INTERNAL}/{migration_id}")

            body = {"id": migration_id, "vm_uuid": vm.uuid, "storage": storage.value,
                    "disks": disks, "deadline_s": settings.deadline_s}  # fmt: skip
            try:
                response = await client.post(base + INTERNAL, json=body, timeout=120)
            except httpx.HTTPError as exc:
                await abandon()
                raise JobError(f"{failed}: node {node.name} did not answer: {exc}") from None
            except asyncio.CancelledError:
                await asyncio.shield(abandon())
                raise
            if response.status_code >= 400:
                raise JobError(f"{failed}: node {node.name} refused: {_detail(response)}")
            target = RemoteTarget(client, base, response.json(), node.name)
            last = [0.0]

            def progress(p: MigrationProgress) -> None:
                now = time.monotonic()
                if now - last[0] < 1.0:
                    return
                last[0] = now
                done = 100 * p.transferred / p.total if p.total else 0
                line = f"{p.phase}: {p.transferred >> 20}/{p.total >> 20} MiB of RAM sent"
                if p.mirrors:
                    copied = sum(m.copied for m in p.mirrors) >> 20
                    line += f", disks {copied}/{sum(m.total for m in p.mirrors) >> 20} MiB"
                line += f", dirty rate {p.dirty_rate >> 10} KiB/s, pass {p.passes}"
                if p.expected_downtime_ms is not None:
                    line += f", expected downtime {p.expected_downtime_ms} ms"
                spawn(ctx.progress(min(99, int(done))))
                spawn(ctx.log(line))

            try:
                stats = await driver.migrate_out(
                    vm.uuid,
                    target,
                    storage=storage,
                    disks=mirror,
                    settings=settings,
                    on_progress=progress,
                )
            except MigrationError as exc:
                await target.abort()
                raise JobError(f"{failed}: {exc}") from None
            except asyncio.CancelledError:
                await target.abort()
                raise
            finally:
                await target.close()
            committed = await client.post(f"{target.url}/commit", timeout=120)
            if committed.status_code >= 400:
                raise JobError(f"node {node.name} could not take the VM over: {_detail(committed)}")
        ctx.commit()
        await self.networks.unplug(vm.uuid)
        await self.ctx.driver.cleanup(vm.uuid, specs.runtime_paths(self.ctx.settings, vm.uuid))
        # This node's copies are unused now: the VM's folder (UEFI variables, seed,
        # disks) and mirrored disks elsewhere (in a local pool: its volumes, or the
        # VM's folder there). Disks in shared pools are the target's.
        folder = specs.vm_dir(self.ctx.settings, vm)
        moved = [Path(d.path) for d in vm.disks if f"disk{d.index}" in mirror]
        await asyncio.to_thread(_remove_copied, folder, vm.uuid, moved)
        downtime = "?" if stats.downtime_ms is None else f"{stats.downtime_ms} ms"
        await ctx.log(
            f"{vm.name} runs on node {node.name}: {stats.total_time_ms} ms in all, "
            f"downtime {downtime}, {stats.transferred >> 20} MiB sent in {stats.passes} passes"
        )
        return {"node": node.name, **asdict(stats)}

    async def _move_stopped(self, vm: Vm, to: str, mirror: list[str]) -> str:
        """--offline: a stopped VM whose disks every node sees changes owner."""
        if vm.state not in ("stopped", "crashed") or self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {vm.name} is {vm.state}: --offline moves a stopped VM")
        if mirror:
            raise Conflict(
                f"VM {vm.name} has {', '.join(mirror)} on this node only (not in a shared "
                "pool): an offline copy of local disks is not built; start it and migrate it live"
            )
        target_id = await self._node_id(to)

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                moved = await session.execute(
                    update(Vm)
                    .where(Vm.uuid == vm.uuid, Vm.node_id == self.ctx.node_id)
                    .values(node_id=target_id)
                    .returning(Vm.id)
                )
                if moved.one_or_none() is None:
                    raise JobError(f"VM {vm.name} is not this node's any more")
                message = f"{vm.name}: moved (stopped) to node {to}"
                session.add(Event(vm_uuid=vm.uuid, kind="migrate", message=message))
                await session.commit()
            await ctx.log(f"{vm.name} belongs to node {to} now")
            return {"node": to, "offline": True}

        return await self.ctx.runner.submit(
            "vm.migrate", f"vm:{vm.uuid}", job, params={"name": vm.name, "to": to, "offline": True}
        )

    async def _node_id(self, name: str) -> int:
        async with self.ctx.sessions() as session:
            node_id = await session.scalar(select(Node.id).where(Node.name == name))
        if node_id is None:
            raise NotFound(f"no node named {name!r}")
        return int(node_id)

    # -- after a restart ----------------------------------------------------------

    async def settle(self, job: Job) -> str | None:
        """A migration this node's stop interrupted ends one way, never both: if the
        target already runs the guest, it is told to take the VM over (this node's
        QEMU is then fenced as a VM moved away); otherwise the target is told to
        abort, and the VM's uuid is returned for `undo` once its QEMU is adopted."""
        vm_uuid = (job.target or "").partition(":")[2]
        params = job.params or {}
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None or "migration_id" not in params:
            return None
        if vm.node_id != self.ctx.node_id:
            log.warning("migration of %s had completed before the stop", vm.name)
            return None
        try:
            node = await self.nodes.address_of(str(params["to"]))
        except NotFound:
            return vm_uuid
        url = f"http://{node.address}{INTERNAL}/{params['migration_id']}"
        async with httpx.AsyncClient(headers=self.nodes.call_headers(), timeout=30) as client:
            try:
                status = await client.post(f"{url}/query-status", json={})
                running = status.status_code == 200 and bool(status.json().get("running"))
                if running:
                    committed = await client.post(f"{url}/commit", timeout=120)
                    if committed.status_code == 200:
                        log.warning("migration of %s completed on node %s", vm.name, node.name)
                        return None
                await client.delete(url)
            except httpx.HTTPError as exc:
                log.error(
                    "node %s did not answer about migration of %s: %s", node.name, vm.name, exc
                )
        log.warning("migration of %s to %s rolled back", vm.name, node.name)
        return vm_uuid

    async def undo(self, vm_uuid: str) -> None:
        """Run the guest on here after an interrupted migration was rolled back."""
        if not self.ctx.driver.is_running(vm_uuid):
            return
        try:
            done = await self.ctx.driver.abandon_migration(vm_uuid)
        except Exception as exc:  # leave the guest alone rather than guess
            log.error("could not undo the interrupted migration of %s: %s", vm_uuid, exc)
            return
        await self.ctx.record_state(vm_uuid, "running", done)

    async def drain(self) -> str:
        """This node admits no new VM, and its running VMs are live-migrated away,
        one at a time, each to the node placement picks for it. Stopped VMs stay
        (their disks are here); the job fails naming any VM that could not move."""
        await self.nodes.set_drained(self.nodes.name, True)

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                running = list(
                    await session.scalars(
                        select(Vm).where(self.ctx.here(), Vm.state == "running").order_by(Vm.name)
                    )
                )
            moved: dict[str, str] = {}
            stayed: list[str] = []
            for n, vm in enumerate(running):
                demand = Demand(vm.vcpus, vm.memory_mib, affinity_group=vm.affinity_group)
                verdict = await self.nodes.place(demand)
                if verdict.node is None:
                    stayed.append(f"{vm.name} ({verdict.explain()})")
                    continue
                await ctx.log(f"moving {vm.name} to {verdict.node}")
                try:
                    job_id = await self.migrate(vm.name, verdict.node, MigrationSettings())
                except Conflict as exc:
                    stayed.append(f"{vm.name} ({exc})")
                    continue
                await self.ctx.runner.wait(job_id)
                result = await self.ctx.runner.get(job_id)
                if result.state == "succeeded":
                    moved[vm.name] = verdict.node
                else:
                    stayed.append(f"{vm.name} ({result.error})")
                await ctx.progress(100 * (n + 1) // len(running))
            if stayed:
                raise JobError(
                    f"node {self.nodes.name} is drained, but VMs stay: {'; '.join(stayed)}"
                )
            await ctx.log(f"node {self.nodes.name} is drained: {len(moved)} VMs moved")
            return {"moved": moved}

        return await self.ctx.runner.submit(
            "node.drain", f"node:{self.nodes.name}", job, params={"node": self.nodes.name}
        )

    async def cancel(self, name: str) -> bool:
        vm = await self.ctx.load_vm(name)
        return self.ctx.driver.cancel_migration(vm.uuid)
