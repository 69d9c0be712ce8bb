"""The QEMU driver: supervises one QEMU process per VM through its QMP monitor.

Per VM the driver holds a `_Vm`: the process handle (pidfd), the single QMP
client for that monitor, the serial console connection and a watcher task
that turns QMP events and process exit into observed-state reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmhive.hypervisor.base import (
    AdoptResult,
    Console,
    Driver,
    DriverError,
    NotRunning,
    ObservedState,
    VmStats,
)
from vmhive.hypervisor.qemu import qga
from vmhive.hypervisor.qemu import stats as qemu_stats
from vmhive.hypervisor.qemu.argv import blockdev_nodes, build_argv
from vmhive.hypervisor.qemu.migration import (
    LiveMigration,
    MigrationProgress,
    MigrationSettings,
    MigrationStats,
    StorageMode,
)
from vmhive.hypervisor.qemu.migration.recovery import abandon
from vmhive.hypervisor.qemu.process import (
    LaunchError,
    QemuProcess,
    RuntimeRecord,
    host_boot_id,
    is_our_process,
    launch,
    process_alive,
    tail,
)
from vmhive.hypervisor.qemu.process import fence as fence_process
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpEvent, QmpMonitor
from vmhive.hypervisor.qemu.serial import SerialConsole
from vmhive.hypervisor.spec import NicSpec, RuntimePaths, VmSpec

log = logging.getLogger(__name__)

QMP_READY_DEADLINE = 15.0
KILL_DEADLINE = 10.0
SERIAL_LOG = "serial.log"
EVENT_DRAIN_DEADLINE = 2.0
BLOCK_JOB_EVENTS = frozenset(
    {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"}
)


@dataclass
class _BlockJob:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None

    def end(self, error: str | None) -> None:
        self.error = error
        self.ended.set()
        self.ready.set()  # nobody waits for a readiness that will never come


@dataclass
class _QemuJob:
    """A QEMU job (snapshot-save/load/delete) as JOB_STATUS_CHANGE events report it."""

    concluded: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "created"


@dataclass
class _PauseWindow:
    """When QEMU says the vCPUs stopped and started again (its event timestamps)."""

    stopped_at: float | None = None
    resumed_at: float | None = None
    resumed: asyncio.Event = field(default_factory=asyncio.Event)

    def seconds(self) -> float | None:
        if self.stopped_at is None or self.resumed_at is None:
            return None
        return max(0.0, self.resumed_at - self.stopped_at)


@dataclass
class _Vm:
    spec: VmSpec
    process: QemuProcess
    monitor: QmpMonitor
    serial: SerialConsole
    watcher: asyncio.Task[None] | None = None
    # Set when the exit that follows is expected (guest power-off, our quit or kill).
    shutdown_reason: str | None = None
    acpi_requested: bool = False
    # device id -> set when QEMU reports DEVICE_DELETED (the guest let go of it)
    unplugged: dict[str, asyncio.Event] = field(default_factory=dict)
    # block job id -> its progress as QEMU's events report it
    block_jobs: dict[str, _BlockJob] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # QEMU job id -> its status as QEMU's events report it
    qemu_jobs: dict[str, _QemuJob] = field(default_factory=dict)
    # Set while a snapshot pauses the guest, to measure the pause
    pause: _PauseWindow | None = None
    # A guest agent holds the org.qemu.guest_agent.0 port open (VSERPORT_CHANGE).
    agent_connected: bool = False
    # Live migration out: copies of its events for the engine; while it runs, the
    # switchover's STOP is not a state to record; once done, the guest runs on
    # another node and this QEMU's exit is not the VM's.
    taps: list[asyncio.Queue[QmpEvent]] = field(default_factory=list)
    migrating: bool = False
    handed_over: bool = False


class QemuDriver(Driver):
    capabilities = frozenset({"pause", "reboot", "acpi-powerdown", "serial-console", "adopt"})

    def __init__(self, *, serial_log_max_bytes: int = 1024 * 1024) -> None:
        super().__init__()
        self._vms: dict[str, _Vm] = {}
        self._migrations: dict[str, LiveMigration] = {}
        self._serial_log_max = serial_log_max_bytes

    # -- start and adopt ----------------------------------------------------

    async def start(self, spec: VmSpec, *, snapshot: str | None = None) -> int:
        if spec.uuid in self._vms:
            raise DriverError(f"VM {spec.name} is already running")
        run_dir = spec.runtime.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        runtime = spec.runtime
        for stale in (
            runtime.qmp_socket,
            runtime.serial_socket,
            runtime.vnc_socket,
            runtime.qga_socket,
            runtime.pidfile,
        ):
            stale.unlink(missing_ok=True)
        # -S: vCPUs start only after the serial console is attached, so the
        # console log holds the guest's output from its very first line.
        argv = [*build_argv(spec), "-S"]
        try:
            process = launch(argv, run_dir, spec.runtime.log_file)
        except LaunchError as exc:
            raise DriverError(str(exc)) from exc
        monitor: QmpMonitor | None = None
        serial = self._serial(spec)
        try:
            monitor = await self._connect_monitor(spec, process)
            await serial.connect()
            RuntimeRecord(
                vm_uuid=spec.uuid,
                pid=process.pid,
                argv=argv,
                boot_id=host_boot_id(),
                started_at=time.time(),
                accel=spec.accel.value,
            ).save(run_dir)
            vm = _Vm(spec, process, monitor, serial)
            self._vms[spec.uuid] = vm
            if snapshot is not None:
                await self._load_snapshot(vm, snapshot)
            await monitor.cont()
        except BaseException as exc:
            self._vms.pop(spec.uuid, None)
            process.send_signal(signal.SIGKILL)
            await process.wait(KILL_DEADLINE)
            await serial.close()
            if monitor is not None:
                await monitor.close()
            detail = " ".join(
                line
                for line in tail(spec.runtime.log_file, 600).splitlines()
                if line.strip() and not line.startswith("--- vmhive:")
            )
            if isinstance(exc, DriverError | MonitorError | OSError | TimeoutError):
                raise DriverError(
                    f"QEMU did not start: {exc}" + (f"; QEMU said: {detail}" if detail else "")
                ) from exc
            raise
        vm.watcher = asyncio.create_task(self._watch(vm), name=f"watch-{spec.name}")
        return process.pid

    async def _connect_monitor(self, spec: VmSpec, process: QemuProcess) -> QmpMonitor:
        """Connect to a fresh QEMU's monitor as soon as it listens.

        QEMU creates the socket a few ms into its start-up, and binds it
        before it listens, so a missing socket or a refused connect is retried
        finely until the deadline, as long as QEMU lives.
        """
        deadline = time.monotonic() + QMP_READY_DEADLINE
        while True:
            if spec.runtime.qmp_socket.exists():
                monitor = QmpMonitor(spec.name)
                try:
                    await monitor.connect(spec.runtime.qmp_socket)
                    return monitor
                except MonitorError:
                    await monitor.close()
                    if time.monotonic() > deadline:
                        raise
            if process.exited.is_set():
                raise DriverError(process.exit_reason())
            if time.monotonic() > deadline:
                raise DriverError(f"no QMP socket after {QMP_READY_DEADLINE:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.exited.wait(), 0.002)

    def _serial(self, spec: VmSpec) -> SerialConsole:
        return SerialConsole(
            spec.runtime.serial_socket, spec.runtime.run_dir / SERIAL_LOG, self._serial_log_max
        )

    async def adopt(self, spec: VmSpec) -> AdoptResult:
        if spec.uuid in self._vms:
            vm = self._vms[spec.uuid]
            return AdoptResult(
                True, await self._query_state(vm), "already attached", vm.process.pid
            )
        record = RuntimeRecord.load(spec.runtime.run_dir)
        if record is None:
            return AdoptResult(False, ObservedState.STOPPED, "no runtime record")
        if record.boot_id != host_boot_id():
            return AdoptResult(False, ObservedState.STOPPED, "the host rebooted since it ran")
        if not is_our_process(record):
            if process_alive(record.pid):
                reason = f"PID {record.pid} now belongs to another program (PID reused)"
            else:
                reason = "QEMU exited while the daemon was not running"
            return AdoptResult(False, ObservedState.CRASHED, reason)
        try:
            process = QemuProcess(record.pid)
        except ProcessLookupError:
            return AdoptResult(False, ObservedState.CRASHED, "QEMU exited during re-adoption")
        monitor = QmpMonitor(spec.name)
        serial = self._serial(spec)
        try:
            await monitor.connect(spec.runtime.qmp_socket)
            await serial.connect()
        except (MonitorError, OSError, TimeoutError) as exc:
            process.detach()
            await monitor.close()
            # Refuse rather than kill: the guest keeps running untouched.
            raise DriverError(f"cannot re-attach to {spec.name} (PID {record.pid}): {exc}") from exc
        vm = _Vm(spec, process, monitor, serial)
        self._vms[spec.uuid] = vm
        vm.watcher = asyncio.create_task(self._watch(vm), name=f"watch-{spec.name}")
        if (await vm.monitor.query_status()).status == "prelaunch":
            # Started with -S and never continued: the daemon died inside a
            # start. The guest never ran, so finishing the rollback loses nothing.
            vm.shutdown_reason = "an interrupted start was rolled back"
            await self.kill(spec.uuid)
            return AdoptResult(False, ObservedState.STOPPED, vm.shutdown_reason)
        state = await self._query_state(vm)
        return AdoptResult(True, state, "re-adopted", record.pid)

    # -- watching -----------------------------------------------------------

    async def _query_state(self, vm: _Vm) -> ObservedState:
        status = await vm.monitor.query_status()
        if status.running:
            return ObservedState.RUNNING
        if status.status in ("paused", "suspended"):
            return ObservedState.PAUSED
        if status.status == "shutdown":
            return ObservedState.STOPPING
        if status.status in ("internal-error", "guest-panicked", "io-error"):
            return ObservedState.CRASHED
        return ObservedState.PAUSED

    async def _watch(self, vm: _Vm) -> None:
        uuid = vm.spec.uuid
        events = asyncio.create_task(self._pump_events(vm))
        try:
            await vm.process.exited.wait()
            # Let the pump report the events QEMU sent before it exited; it
            # ends by itself once the closed monitor's queue is drained.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(events), EVENT_DRAIN_DEADLINE)
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
        await vm.monitor.close()
        await vm.serial.close()
        self._vms.pop(uuid, None)
        try:
            if vm.handed_over:
                pass  # the guest runs on another node: nothing to record here
            elif vm.shutdown_reason is not None:
                await self._report(uuid, ObservedState.STOPPED, vm.shutdown_reason)
            else:
                reason = vm.process.exit_reason()
                detail = tail(vm.spec.runtime.log_file, 300).strip().splitlines()
                if detail and "vmhive: starting QEMU" not in detail[-1]:
                    reason += f"; last log line: {detail[-1]}"
                await self._report(uuid, ObservedState.CRASHED, reason)
        finally:
            # Set only after the report: whoever waits for the stop reads the final state.
            vm.stopped.set()

    async def _pump_events(self, vm: _Vm) -> None:
        uuid = vm.spec.uuid
        while True:
            try:
                event = await vm.monitor.next_event()
            except MonitorError:
                return
            for tap in vm.taps:
                tap.put_nowait(event)
            if vm.migrating and event.name in ("STOP", "RESUME"):
                continue
            if event.name == "SHUTDOWN":
                guest = bool(event.data.get("guest"))
                cause = str(event.data.get("reason", ""))
                if vm.shutdown_reason is None:
                    if not guest:
                        vm.shutdown_reason = f"QEMU shut down ({cause})"
                    elif vm.acpi_requested:
                        vm.shutdown_reason = "the guest powered off at the ACPI power button"
                    else:
                        vm.shutdown_reason = "the guest powered itself off"
                await self._report(uuid, ObservedState.STOPPING, vm.shutdown_reason)
            elif event.name == "STOP":
                if vm.pause is not None:  # a snapshot's instant, not a state to record
                    vm.pause.stopped_at = event.timestamp
                else:
                    await self._report(uuid, ObservedState.PAUSED, "")
            elif event.name == "RESUME":
                if vm.pause is not None:
                    vm.pause.resumed_at = event.timestamp
                    vm.pause.resumed.set()
                else:
                    await self._report(uuid, ObservedState.RUNNING, "")
            elif event.name == "JOB_STATUS_CHANGE":
                qemu_job = vm.qemu_jobs.get(str(event.data.get("id", "")))
                if qemu_job is not None:
                    qemu_job.status = str(event.data.get("status", ""))
                    if qemu_job.status == "concluded":
                        qemu_job.concluded.set()
            elif event.name == "VSERPORT_CHANGE" and event.data.get("id") == "qga0":
                vm.agent_connected = bool(event.data.get("open"))
            elif event.name == "DEVICE_DELETED":
                device = str(event.data.get("device", ""))
                vm.unplugged.setdefault(device, asyncio.Event()).set()
            elif event.name in BLOCK_JOB_EVENTS:
                job = vm.block_jobs.get(str(event.data.get("device", "")))
                if job is None:
                    continue
                if event.name == "BLOCK_JOB_READY":
                    job.ready.set()
                elif event.name == "BLOCK_JOB_ERROR":
                    job.error = f"I/O error ({event.data.get('operation', 'copy')})"
                elif event.name == "BLOCK_JOB_COMPLETED":
                    job.end(str(event.data["error"]) if "error" in event.data else job.error)
                else:  # BLOCK_JOB_CANCELLED: abandoned before it was in sync
                    job.end(job.error or "the copy was cancelled")
            elif event.name == "GUEST_PANICKED":
                await self._report(uuid, ObservedState.CRASHED, "the guest kernel panicked")

    # -- control --------------------------------------------------------------

    def _get(self, vm_uuid: str) -> _Vm:
        vm = self._vms.get(vm_uuid)
        if vm is None:
            raise NotRunning("the VM is not running")
        return vm

    def is_running(self, vm_uuid: str) -> bool:
        return vm_uuid in self._vms

    def pid(self, vm_uuid: str) -> int | None:
        vm = self._vms.get(vm_uuid)
        return vm.process.pid if vm else None

    async def powerdown(self, vm_uuid: str) -> None:
        self._get(vm_uuid).acpi_requested = True
        await self._command(vm_uuid, "system_powerdown")

    async def reset(self, vm_uuid: str) -> None:
        await self._command(vm_uuid, "system_reset")

    async def pause(self, vm_uuid: str) -> None:
        await self._command(vm_uuid, "stop")

    async def resume(self, vm_uuid: str) -> None:
        await self._command(vm_uuid, "cont")

    async def insert_media(self, vm_uuid: str, drive: int, iso: Path) -> None:
        await self._command(vm_uuid, "change_medium", f"cdrom{drive}", str(iso))

    async def eject_media(self, vm_uuid: str, drive: int) -> None:
        await self._command(vm_uuid, "eject", f"cdrom{drive}")

    async def hotplug_disk(self, vm_uuid: str, index: int, path: Path, fmt: str) -> None:
        vm = self._get(vm_uuid)
        if vm.spec.generation != 2:
            raise DriverError("disks can be hot-plugged on generation 2 VMs only")
        name = f"disk{index}"
        try:
            port = await self._free_root_port(vm)
            added: list[str] = []
            try:
                for node in blockdev_nodes(name, str(path), fmt, read_only=False):
                    await vm.monitor.blockdev_add(node)
                    added.append(str(node["node-name"]))
                vm.unplugged.pop(name, None)
                await vm.monitor.device_add(
                    {"driver": "virtio-blk-pci", "id": name, "drive": name, "bus": port}
                )
            except MonitorError:
                for node_name in reversed(added):
                    with contextlib.suppress(MonitorError):
                        await vm.monitor.blockdev_del(node_name)
                raise
        except MonitorError as exc:
            raise DriverError(f"hot-plug of {path} failed: {exc}") from exc

    async def copy_disks_live(
        self,
        vm_uuid: str,
        targets: Sequence[tuple[int, Path]],
        progress: Callable[[int], Awaitable[None]] | None = None,
        timeout: float = 6 * 3600,
    ) -> None:
        """Copy disks of a running VM into new qcow2 files (created, of the same
        virtual size) while the guest runs on: one mirror job a disk; once all are
        in sync the guest is paused for the instant it takes to end them, so the
        copies are one crash-consistent point in time across disks."""
        vm = self._get(vm_uuid)
        monitor = vm.monitor
        added: list[str] = []
        jobs: dict[str, _BlockJob] = {}
        try:
            async with asyncio.timeout(timeout):
                for index, path in targets:
                    target = f"copy{index}"
                    for node in blockdev_nodes(target, str(path), "qcow2", read_only=False):
                        await monitor.blockdev_add(node)
                        added.append(str(node["node-name"]))
                    job_id = f"copy-disk{index}"
                    jobs[job_id] = vm.block_jobs[job_id] = _BlockJob()
                    await monitor.blockdev_mirror(job_id, f"disk{index}", target)
                while not all(job.ready.is_set() for job in jobs.values()):
                    if progress is not None:
                        running = [
                            j for j in await monitor.query_block_jobs() if j["device"] in jobs
                        ]
                        total = sum(int(j.get("len", 0)) for j in running) or 1
                        await progress(99 * sum(int(j.get("offset", 0)) for j in running) // total)
                    await _first_set([j.ready for j in jobs.values()], 0.5)
                failed = [f"{i}: {j.error}" for i, j in jobs.items() if j.ended.is_set()]
                if failed:
                    raise DriverError(f"live copy failed: {'; '.join(failed)}")
                was_running = (await monitor.query_status()).running
                if was_running:
                    await monitor.stop()
                try:
                    for job_id in jobs:
                        await monitor.block_job_cancel(job_id)
                    for job in jobs.values():
                        await job.ended.wait()
                finally:
                    if was_running:
                        await monitor.cont()
                failed = [f"{i}: {j.error}" for i, j in jobs.items() if j.error]
                if failed:
                    raise DriverError(f"live copy failed: {'; '.join(failed)}")
        except TimeoutError:
            raise DriverError(f"live copy did not finish within {timeout:g} s") from None
        except MonitorError as exc:
            raise DriverError(f"live copy failed: {exc}") from exc
        finally:
            for job_id, job in jobs.items():
                if not job.ended.is_set():
                    with contextlib.suppress(MonitorError):
                        await monitor.block_job_cancel(job_id)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(job.ended.wait(), 10)
                vm.block_jobs.pop(job_id, None)
            for node_name in reversed(added):
                with contextlib.suppress(MonitorError):
                    await monitor.blockdev_del(node_name)

    async def freeze_filesystems(self, vm_uuid: str) -> int | None:
        """Ask the guest agent to freeze the guest's filesystems; how many it froze,
        or None when no agent runs in the guest (the snapshot is then crash-consistent)."""
        vm = self._get(vm_uuid)
        if not vm.agent_connected:
            return None
        try:
            return int(
                await qga.call(vm.spec.runtime.qga_socket, "guest-fsfreeze-freeze", timeout=30)
            )
        except qga.GuestAgentError as exc:
            with contextlib.suppress(qga.GuestAgentError):  # a partial freeze must not stay
                await qga.call(vm.spec.runtime.qga_socket, "guest-fsfreeze-thaw", timeout=10)
            raise DriverError(f"could not freeze the guest's filesystems: {exc}") from exc

    async def thaw_filesystems(self, vm_uuid: str) -> int:
        vm = self._get(vm_uuid)
        try:
            return int(
                await qga.call(vm.spec.runtime.qga_socket, "guest-fsfreeze-thaw", timeout=30)
            )
        except qga.GuestAgentError as exc:
            raise DriverError(f"could not thaw the guest's filesystems: {exc}") from exc

    async def hotplug_nic(self, vm_uuid: str, index: int, nic: NicSpec) -> None:
        """Add NIC `index` (a TAP opened by name) to a running generation 2 VM."""
        vm = self._get(vm_uuid)
        if vm.spec.generation != 2:
            raise DriverError("NICs can be hot-plugged on generation 2 VMs only")
        if nic.backend != "tap" or nic.tap is None:
            raise DriverError("only TAP NICs can be hot-plugged")
        name = f"net{index}"
        try:
            port = await self._free_root_port(vm)
            await vm.monitor.netdev_add(
                {"type": "tap", "id": name, "ifname": nic.tap, "script": "no", "downscript": "no"}
            )
            vm.unplugged.pop(name, None)
            try:
                await vm.monitor.device_add(
                    {
                        "driver": nic.model or "virtio-net-pci",
                        "id": name,
                        "netdev": name,
                        "mac": nic.mac,
                        "bus": port,
                    }
                )
            except MonitorError:
                with contextlib.suppress(MonitorError):
                    await vm.monitor.netdev_del(name)
                raise
        except MonitorError as exc:
            raise DriverError(f"hot-plug of NIC {index} failed: {exc}") from exc

    async def unplug_nic(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        """Remove NIC `index` from a running VM once the guest has let go of it."""
        vm = self._get(vm_uuid)
        name = f"net{index}"
        try:
            await self._release_device(vm, name, f"NIC {index}", timeout)
            await vm.monitor.netdev_del(name)
        except MonitorError as exc:
            raise DriverError(f"unplug of NIC {index} failed: {exc}") from exc

    async def set_nic_link(self, vm_uuid: str, index: int, up: bool) -> None:
        await self._command(vm_uuid, "set_link", f"net{index}", up)

    # -- snapshots ----------------------------------------------------------------

    async def snapshot(
        self,
        vm_uuid: str,
        tag: str,
        disks: Sequence[int],
        *,
        memory: bool,
        while_paused: Callable[[], Awaitable[None]] | None = None,
        timeout: float = 3600,
    ) -> float:
        """Disk-only: a `transaction` of internal snapshots, inside a stop/cont.
        With memory: a snapshot-save job (QEMU keeps the vCPUs stopped while it
        writes the RAM into the first disk), inside the same stop/cont."""
        vm = self._get(vm_uuid)
        monitor = vm.monitor
        nodes = [f"disk{index}" for index in disks]
        window = _PauseWindow()
        began = time.monotonic()
        try:
            was_running = (await monitor.query_status()).running
            if was_running:
                vm.pause = window
                await monitor.stop()
            try:
                if while_paused is not None:
                    await while_paused()
                if memory:
                    job_id = f"save-{tag}"
                    await self._run_job(
                        vm,
                        job_id,
                        lambda: monitor.snapshot_save(job_id, tag, nodes[0], nodes),
                        timeout,
                    )
                else:
                    await monitor.snapshot_internal(tag, nodes)
            finally:
                if was_running:
                    await monitor.cont()
            if not was_running:
                return 0.0
            elapsed = time.monotonic() - began
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(window.resumed.wait(), EVENT_DRAIN_DEADLINE)
            paused = window.seconds()
            return elapsed if paused is None else paused
        except MonitorError as exc:
            raise DriverError(f"snapshot failed: {exc}") from exc
        finally:
            vm.pause = None

    async def delete_snapshot(
        self, vm_uuid: str, tag: str, disks: Sequence[int], timeout: float = 3600
    ) -> None:
        vm = self._get(vm_uuid)
        nodes = [f"disk{index}" for index in disks]
        job_id = f"delete-{tag}"
        try:
            await self._run_job(
                vm, job_id, lambda: vm.monitor.snapshot_delete(job_id, tag, nodes), timeout
            )
        except MonitorError as exc:
            raise DriverError(f"deleting snapshot failed: {exc}") from exc

    async def settle_snapshot_jobs(self, vm_uuid: str, timeout: float = 600) -> None:
        vm = self._get(vm_uuid)
        trackers: dict[str, _QemuJob] = {}
        try:
            for job in await vm.monitor.query_jobs():
                if str(job.get("type", "")).startswith("snapshot-"):
                    trackers[str(job["id"])] = vm.qemu_jobs.setdefault(str(job["id"]), _QemuJob())
            # Asked again now that the trackers exist: a job that concluded in between
            # sent its last event before anyone listened for it.
            for job in await vm.monitor.query_jobs():
                tracker = trackers.get(str(job.get("id", "")))
                if tracker is not None and job.get("status") == "concluded":
                    tracker.concluded.set()
            for job_id, tracker in trackers.items():
                await self._wait_job(vm, tracker, timeout)
                await vm.monitor.job_dismiss(job_id)
        except MonitorError as exc:
            raise DriverError(f"cannot clear QEMU's snapshot jobs: {exc}") from exc
        finally:
            for job_id in trackers:
                vm.qemu_jobs.pop(job_id, None)

    async def _load_snapshot(self, vm: _Vm, tag: str) -> None:
        """At start, before `cont`: revert the disks and load the RAM of `tag`. The
        watcher does not run yet, so the events are pumped for the job's duration."""
        nodes = [f"disk{index}" for index in range(len(vm.spec.disks))]
        if not nodes:
            raise DriverError("a VM without disks has no snapshot to load")
        job_id = f"load-{tag}"
        pump = asyncio.create_task(self._pump_events(vm))
        try:
            await self._run_job(
                vm, job_id, lambda: vm.monitor.snapshot_load(job_id, tag, nodes[0], nodes), 600
            )
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _run_job(
        self, vm: _Vm, job_id: str, begin: Callable[[], Awaitable[None]], timeout: float
    ) -> None:
        """Start a QEMU job, wait for it to conclude, read its error, dismiss it."""
        tracker = vm.qemu_jobs[job_id] = _QemuJob()
        try:
            await begin()
            await self._wait_job(vm, tracker, timeout)
            error = next(
                (
                    str(job["error"])
                    for job in await vm.monitor.query_jobs()
                    if job.get("id") == job_id and "error" in job
                ),
                None,
            )
            await vm.monitor.job_dismiss(job_id)
        finally:
            vm.qemu_jobs.pop(job_id, None)
        if error is not None:
            raise DriverError(error)

    async def _wait_job(self, vm: _Vm, tracker: _QemuJob, timeout: float) -> None:
        if not tracker.concluded.is_set() and not vm.process.exited.is_set():
            await _first_set([tracker.concluded, vm.process.exited], timeout)
        if tracker.concluded.is_set():
            return
        if vm.process.exited.is_set():
            raise DriverError(f"QEMU exited during the job: {vm.process.exit_reason()}")
        raise DriverError(f"QEMU's job did not end within {timeout:g} s")

    async def _free_root_port(self, vm: _Vm) -> str:
        """The first pcie-root-port with nothing plugged in, as QEMU sees it now."""
        for bus in await vm.monitor.query_pci():
            for device in bus.get("devices", []):
                bridge = device.get("pci_bridge")
                qdev_id = str(device.get("qdev_id", ""))
                if bridge is not None and qdev_id.startswith("rp") and not bridge.get("devices"):
                    return qdev_id
        raise DriverError("no free hot-plug slot left: stop the VM to add more disks")

    @staticmethod
    async def _release_device(vm: _Vm, device_id: str, what: str, timeout: float) -> None:
        """`device_del`, then wait for DEVICE_DELETED: the guest has let go of it."""
        released = vm.unplugged.setdefault(device_id, asyncio.Event())
        released.clear()
        await vm.monitor.device_del(device_id)
        try:
            await asyncio.wait_for(released.wait(), timeout)
        except TimeoutError:
            raise DriverError(f"the guest did not release {what} within {timeout:g} s") from None

    async def unplug_disk(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        vm = self._get(vm_uuid)
        name = f"disk{index}"
        try:
            await self._release_device(vm, name, name, timeout)
            await vm.monitor.blockdev_del(name)
            await vm.monitor.blockdev_del(f"{name}-file")
        except MonitorError as exc:
            raise DriverError(f"unplug of {name} failed: {exc}") from exc

    async def block_resize(self, vm_uuid: str, node: str, size: int) -> None:
        await self._command(vm_uuid, "block_resize", node, size)

    async def _command(self, vm_uuid: str, name: str, *args: object) -> None:
        vm = self._get(vm_uuid)
        try:
            await getattr(vm.monitor, name)(*args)
        except MonitorError as exc:
            raise DriverError(f"{name} failed: {exc}") from exc

    async def kill(self, vm_uuid: str) -> None:
        vm = self._vms.get(vm_uuid)
        if vm is None:
            return
        if vm.shutdown_reason is None:
            vm.shutdown_reason = "forced off"
        with contextlib.suppress(MonitorError):
            await asyncio.wait_for(vm.monitor.quit(), 3)
        if not await vm.process.wait(3):
            vm.process.send_signal(signal.SIGKILL)
            if not await vm.process.wait(KILL_DEADLINE):
                raise DriverError(f"QEMU (PID {vm.process.pid}) did not die after SIGKILL")
        await asyncio.wait_for(vm.stopped.wait(), KILL_DEADLINE)

    async def wait_stopped(self, vm_uuid: str, timeout: float) -> bool:
        vm = self._vms.get(vm_uuid)
        if vm is None:
            return True
        try:
            await asyncio.wait_for(vm.stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def fence(self, runtime: RuntimePaths) -> str | None:
        pid = await asyncio.to_thread(fence_process, runtime.run_dir)
        return None if pid is None else f"killed its QEMU (PID {pid})"

    # -- live migration out ----------------------------------------------------

    async def block_node_sizes(self, vm_uuid: str) -> dict[str, int]:
        """Each block node's virtual size, as the running QEMU sees it."""
        return await self._get(vm_uuid).monitor.block_node_sizes()

    async def migrate_out(
        self,
        vm_uuid: str,
        target: Any,
        *,
        storage: StorageMode,
        disks: Sequence[str],
        settings: MigrationSettings,
        on_progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationStats:
        """Move the running guest to `target` (a MigrationTarget, or one on another
        node behind the same interface). On success this QEMU is gone, silently: the
        VM is the target's now. On failure the guest runs here as before."""
        vm = self._get(vm_uuid)
        feed = _EventFeed()
        vm.taps.append(feed.queue)
        engine = LiveMigration(
            vm.monitor,
            target,
            storage=storage,
            disks=disks,
            settings=settings,
            on_progress=on_progress,
            source_events=feed,
        )
        self._migrations[vm_uuid] = engine
        vm.migrating = True
        try:
            stats = await engine.run()
        finally:
            vm.migrating = False
            vm.taps.remove(feed.queue)
            self._migrations.pop(vm_uuid, None)
        vm.handed_over = True  # its exit is not recorded: the VM runs on elsewhere
        vm.shutdown_reason = "migrated to another node"
        await self.kill(vm_uuid)
        return stats

    async def abandon_migration(self, vm_uuid: str) -> str:
        """After a daemon restart: undo an interrupted outgoing migration and run
        the guest on (see migration.recovery)."""
        return await abandon(self._get(vm_uuid).monitor)

    def cancel_migration(self, vm_uuid: str) -> bool:
        engine = self._migrations.get(vm_uuid)
        if engine is None:
            return False
        engine.cancel()
        return True

    def console(self, vm_uuid: str) -> Console | None:
        vm = self._vms.get(vm_uuid)
        return vm.serial if vm else None

    async def stats(self, vm_uuid: str) -> VmStats | None:
        vm = self._vms.get(vm_uuid)
        return None if vm is None else await qemu_stats.collect(vm.spec, vm.process.pid, vm.monitor)

    def console_log(self, runtime: RuntimePaths) -> bytes:
        try:
            return (runtime.run_dir / SERIAL_LOG).read_bytes()
        except FileNotFoundError:
            return b""

    async def detach_all(self) -> None:
        for vm in list(self._vms.values()):
            if vm.watcher is not None:
                vm.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await vm.watcher
            vm.process.detach()
            await vm.monitor.close()
            await vm.serial.close()
        self._vms.clear()

    async def cleanup(self, vm_uuid: str, runtime: RuntimePaths) -> None:
        if vm_uuid in self._vms:
            raise DriverError("cannot clean up a running VM")
        shutil.rmtree(runtime.run_dir, ignore_errors=True)


class _EventFeed:
    """The engine's copy of a migrating VM's events (the driver is the monitor's
    one reader)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[QmpEvent] = asyncio.Queue()

    async def next_event(self, timeout: float | None = None) -> QmpEvent:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def _first_set(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Wait until one more of `events` is set, or `timeout` passes."""
    waiters = [asyncio.create_task(e.wait()) for e in events if not e.is_set()]
    if not waiters:
        return
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
