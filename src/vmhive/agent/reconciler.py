"""This host's agent: brings observed state toward desired state.

At daemon start it recovers from whatever the last daemon left: jobs that
were running are failed, half-created VMs are removed, half-deleted VMs are
finished, running QEMUs are re-adopted, and autostart VMs are started. While
the daemon runs it records every state change the driver reports, and a
level-triggered loop re-checks each VM periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from sqlalchemy import select

from vmhive.hypervisor.base import DriverError, ObservedState
from vmhive.hypervisor.qemu.process import find_qemu_processes_under
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.images import ImageService
from vmhive.services.lifecycle import Lifecycle
from vmhive.services.migrations import MigrationService
from vmhive.services.networks import NetworkService
from vmhive.services.vms import VmService
from vmhive.services.volumes import VolumeService
from vmhive.store.models import Event, Vm

log = logging.getLogger(__name__)

ACTIVE_STATES = ("starting", "running", "paused", "stopping")


class Agent:
    def __init__(
        self,
        ctx: ServiceContext,
        vms: VmService,
        lifecycle: Lifecycle,
        volumes: VolumeService,
        images: ImageService,
        networks: NetworkService,
        migrations: MigrationService | None = None,
    ) -> None:
        self.ctx = ctx
        self.migrations = migrations
        self.vms = vms
        self.volumes = volumes
        self.images = images
        self.networks = networks
        self.lifecycle = lifecycle
        self._loop_task: asyncio.Task[None] | None = None
        ctx.driver.on_state = self.on_state

    async def on_state(self, vm_uuid: str, state: ObservedState, reason: str) -> None:
        """Record a state the driver observed; a guest power-off is the user's wish."""
        desired: str | None = None
        pid: int | bool | None = False  # False: leave the recorded PID alone
        if state == ObservedState.STOPPED:
            desired, pid = "stopped", None
        elif state == ObservedState.CRASHED:
            pid = None  # desired stays: the user still wants it running; the crash shows
            log.warning("VM %s crashed: %s", vm_uuid, reason)
        await self.ctx.record_state(vm_uuid, state.value, reason, desired=desired, pid=pid)
        if state in (ObservedState.STOPPED, ObservedState.CRASHED):
            await self.networks.unplug(vm_uuid)

    async def recover(self) -> None:
        rolled_back: list[str] = []
        for job in await self.ctx.runner.recover():
            log.warning("job %s (%s) was interrupted by a daemon stop", job.id, job.kind)
            if job.kind == "vm.migrate" and self.migrations is not None:
                vm_uuid = await self.migrations.settle(job)
                rolled_back += [vm_uuid] if vm_uuid else []
            await self._undo_interrupted(job.kind, job.target or "")
        await asyncio.to_thread(self._sweep_partial_files)
        async with self.ctx.sessions() as session:
            vms = list(await session.scalars(select(Vm).where(self.ctx.here())))
        for vm in vms:
            if vm.state == "creating":
                log.warning("removing VM %s: its creation was interrupted", vm.name)
                await self.vms.finish_delete(vm.uuid)
            elif vm.state == "deleting":
                log.warning("finishing the interrupted deletion of VM %s", vm.name)
                await self.vms.finish_delete(vm.uuid)
            else:
                await self._adopt(vm)
        for vm_uuid in rolled_back:
            if self.migrations is not None:
                await self.migrations.undo(vm_uuid)
        await self._fence_moved_away()
        self._report_unowned()

    async def _fence_moved_away(self) -> None:
        """VMs that ran here and belong to another node now (moved while this node
        was down or thought dead): their QEMU must not run on here as well. The
        same for an incoming migration this node's stop cut short: its QEMU, TAPs,
        run directory and new disks go (the VM's files in shared pools stay)."""
        async with self.ctx.sessions() as session:
            others = list(await session.scalars(select(Vm).where(~self.ctx.here())))
        for vm in others:
            runtime = specs.runtime_paths(self.ctx.settings, vm.uuid)
            folder = specs.vm_dir(self.ctx.settings, vm)
            if not runtime.run_dir.exists() and not folder.exists():
                continue
            done = await self.ctx.driver.fence(runtime)
            await self.networks.unplug(vm.uuid)
            for leftover in (runtime.run_dir, folder):
                await asyncio.to_thread(shutil.rmtree, leftover, True)
            if done is not None:
                log.warning("VM %s belongs to another node now: %s", vm.name, done)
                async with self.ctx.sessions() as session:
                    message = f"{vm.name}: fenced on this node ({done})"
                    session.add(Event(vm_uuid=vm.uuid, kind="fence", message=message))
                    await session.commit()

    async def _undo_interrupted(self, kind: str, target: str) -> None:
        """What an interrupted job made and would have rolled back. (Half-made
        VMs carry their own mark, `creating`, and are handled below.)"""
        what, _, key = target.partition(":")
        if kind in ("volume.create", "volume.import") and what == "volume" and key.isdigit():
            await self.volumes.discard_unfinished(int(key))
        elif kind == "image.import" and what == "image":
            log.warning("removing image %s: its import was interrupted", key)
            await asyncio.to_thread(self.images.store.remove, key)

    def _sweep_partial_files(self) -> None:
        """Temporary files of downloads, copies and conversions that never finished."""
        settings = self.ctx.settings
        patterns = [
            (settings.data_dir / "import", ".download-*"),
            (settings.data_dir / "iso", ".*.partial"),
            (settings.images, ".*.part"),
            *((Path(path), ".*.part") for path in self.volumes.pools.dir_paths()),
        ]
        for directory, pattern in patterns:
            if directory.is_dir():
                for leftover in directory.glob(pattern):
                    log.warning("removing %s, left by an interrupted job", leftover)
                    leftover.unlink(missing_ok=True)

    async def _adopt(self, vm: Vm) -> None:
        spec = specs.build_spec(self.ctx.settings, vm, vm.accel or self.ctx.host.accel.accel)
        try:
            result = await self.ctx.driver.adopt(spec)
        except DriverError as exc:
            # Never kill a guest we cannot talk to: show it, and leave it alone.
            log.error("%s", exc)
            await self.ctx.record_state(vm.uuid, "crashed", f"unmanageable: {exc}")
            return
        if result.adopted:
            log.info("re-adopted VM %s (PID %s, %s)", vm.name, result.pid, result.state)
            await self.ctx.record_state(vm.uuid, result.state.value, "", pid=result.pid)
        elif vm.state in ACTIVE_STATES:
            state = result.state.value
            desired = "stopped" if result.state == ObservedState.STOPPED else None
            await self.ctx.record_state(vm.uuid, state, result.reason, desired=desired, pid=None)
        elif vm.state != "crashed":
            await self.ctx.record_state(vm.uuid, "stopped", vm.state_reason, pid=None)

    def _report_unowned(self) -> None:
        run_root = self.ctx.settings.run_root
        if not run_root.exists():
            return
        owned = {
            pid for pid in (self.ctx.driver.pid(u) for u in self._known_uuids()) if pid is not None
        }
        unowned = {
            pid: argv
            for pid, argv in find_qemu_processes_under(run_root).items()
            if pid not in owned
        }
        self.ctx.host.unowned_processes = unowned
        for pid, argv in unowned.items():
            log.warning(
                "QEMU PID %s runs from %s but belongs to no VM: %s", pid, run_root, argv[:6]
            )

    def _known_uuids(self) -> list[str]:
        run_root = self.ctx.settings.run_root
        return [p.name for p in run_root.iterdir()] if run_root.exists() else []

    async def autostart(self) -> None:
        async with self.ctx.sessions() as session:
            names = list(
                await session.scalars(
                    select(Vm.name).where(
                        Vm.autostart.is_(True),
                        Vm.state.in_(("stopped", "crashed")),
                        self.ctx.here(),
                    )
                )
            )
        for name in names:
            log.info("autostarting VM %s", name)
            await self.lifecycle.start(name)

    def start_loop(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop_loop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.settings.reconcile_interval)
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed")

    async def reconcile_once(self) -> None:
        """Level-triggered check: a VM recorded as active must have a live QEMU;
        the firewall follows the addresses DHCP handed out."""
        await self.networks.refresh()
        async with self.ctx.sessions() as session:
            vms = list(
                await session.scalars(
                    select(Vm).where(Vm.state.in_(ACTIVE_STATES), self.ctx.here())
                )
            )
        for vm in vms:
            if vm.state == "starting" or self.ctx.driver.is_running(vm.uuid):
                continue
            if self.ctx.runner.busy(f"vm:{vm.uuid}"):
                continue
            await self.ctx.record_state(
                vm.uuid, "crashed", "QEMU is gone (found by the reconciler)", pid=None
            )
            async with self.ctx.sessions() as session:
                session.add(Event(vm_uuid=vm.uuid, kind="reconcile", message=f"{vm.name}: lost"))
                await session.commit()
