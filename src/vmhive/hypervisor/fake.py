"""An in-memory driver: lets the services, jobs and API be tested in milliseconds.

It keeps the real driver's contract: start returns a PID, power-off and kill
report STOPPED through the state callback, `crash` simulates a QEMU death.
Snapshots of a "running" VM are real internal snapshots of its disk files
(made with qemu-img, since no QEMU holds them), without RAM.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from vmhive.hypervisor.base import (
    AdoptResult,
    Console,
    DiskCounters,
    Driver,
    DriverError,
    NicCounters,
    NotRunning,
    ObservedState,
    VmStats,
)
from vmhive.hypervisor.spec import NicSpec, RuntimePaths, VmSpec


class FakeConsole(Console):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    async def write(self, data: bytes) -> None:
        self.written += data
        self._broadcast(data)  # echo, as a terminal would


class FakeDriver(Driver):
    capabilities = frozenset({"pause", "reboot", "acpi-powerdown", "serial-console"})

    def __init__(self, *, honour_powerdown: bool = True) -> None:
        super().__init__()
        self.honour_powerdown = honour_powerdown
        self.started: dict[str, VmSpec] = {}
        self.paused: set[str] = set()
        self.consoles: dict[str, FakeConsole] = {}
        self.fail_next_start: str | None = None
        self.resized: dict[tuple[str, str], int] = {}
        self.live_copies: list[tuple[str, list[int]]] = []
        self.hotplugged_nics: dict[tuple[str, int], NicSpec] = {}
        # VMs whose guest runs an agent: uuid -> how many filesystems it freezes
        self.agents: dict[str, int] = {}
        self.frozen: set[str] = set()
        self.links: dict[tuple[str, int], bool] = {}
        self.media: dict[tuple[str, int], Path] = {}
        self.hotplugged: dict[tuple[str, int], Path] = {}
        # (vm uuid, tag, with memory) of every snapshot taken of a running VM
        self.snapshots_taken: list[tuple[str, str, bool]] = []
        # vm uuid -> the snapshot its last start loaded
        self.loaded_snapshots: dict[str, str] = {}
        self._pids = itertools.count(10_000)
        self._stopped: dict[str, asyncio.Event] = {}
        # vm uuid -> (pid, monotonic start time): stats grow from the start
        self.stats_base: dict[str, tuple[int, float]] = {}

    async def start(self, spec: VmSpec, *, snapshot: str | None = None) -> int:
        if spec.uuid in self.started:
            raise DriverError(f"VM {spec.name} is already running")
        if self.fail_next_start:
            message, self.fail_next_start = self.fail_next_start, None
            raise DriverError(message)
        if snapshot is not None:
            self.loaded_snapshots[spec.uuid] = snapshot
        self.started[spec.uuid] = spec
        self.consoles[spec.uuid] = FakeConsole()
        self._stopped[spec.uuid] = asyncio.Event()
        pid = next(self._pids)
        self.stats_base[spec.uuid] = (pid, time.monotonic())
        return pid

    async def adopt(self, spec: VmSpec) -> AdoptResult:
        if spec.uuid in self.started:
            return AdoptResult(True, ObservedState.RUNNING, "re-adopted", 1)
        return AdoptResult(False, ObservedState.STOPPED, "no process")

    def is_running(self, vm_uuid: str) -> bool:
        return vm_uuid in self.started

    def pid(self, vm_uuid: str) -> int | None:
        return 1 if vm_uuid in self.started else None

    def _need(self, vm_uuid: str) -> None:
        if vm_uuid not in self.started:
            raise NotRunning("the VM is not running")

    async def _gone(self, vm_uuid: str, state: ObservedState, reason: str) -> None:
        self.started.pop(vm_uuid, None)
        self.paused.discard(vm_uuid)
        self.consoles.pop(vm_uuid, None)
        await self._report(vm_uuid, state, reason)
        self._stopped.pop(vm_uuid, asyncio.Event()).set()

    async def powerdown(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        if self.honour_powerdown:
            asyncio.get_running_loop().call_later(
                0.01,
                lambda: asyncio.ensure_future(
                    self._gone(vm_uuid, ObservedState.STOPPED, "the guest powered itself off")
                ),
            )

    async def reset(self, vm_uuid: str) -> None:
        self._need(vm_uuid)

    async def pause(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        self.paused.add(vm_uuid)

    async def resume(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        self.paused.discard(vm_uuid)

    async def insert_media(self, vm_uuid: str, drive: int, iso: Path) -> None:
        self._need(vm_uuid)
        self.media[(vm_uuid, drive)] = iso

    async def eject_media(self, vm_uuid: str, drive: int) -> None:
        self._need(vm_uuid)
        self.media.pop((vm_uuid, drive), None)

    async def hotplug_disk(self, vm_uuid: str, index: int, path: Path, fmt: str) -> None:
        self._need(vm_uuid)
        self.hotplugged[(vm_uuid, index)] = path

    async def unplug_disk(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        self._need(vm_uuid)
        self.hotplugged.pop((vm_uuid, index), None)

    async def freeze_filesystems(self, vm_uuid: str) -> int | None:
        self._need(vm_uuid)
        if vm_uuid not in self.agents:
            return None
        self.frozen.add(vm_uuid)
        return self.agents[vm_uuid]

    async def thaw_filesystems(self, vm_uuid: str) -> int:
        self._need(vm_uuid)
        self.frozen.discard(vm_uuid)
        return self.agents.get(vm_uuid, 0)

    async def hotplug_nic(self, vm_uuid: str, index: int, nic: NicSpec) -> None:
        self._need(vm_uuid)
        self.hotplugged_nics[(vm_uuid, index)] = nic

    async def unplug_nic(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        self._need(vm_uuid)
        self.hotplugged_nics.pop((vm_uuid, index), None)

    async def set_nic_link(self, vm_uuid: str, index: int, up: bool) -> None:
        self._need(vm_uuid)
        self.links[(vm_uuid, index)] = up

    async def copy_disks_live(
        self,
        vm_uuid: str,
        targets: Sequence[tuple[int, Path]],
        progress: Callable[[int], Awaitable[None]] | None = None,
        timeout: float = 6 * 3600,
    ) -> None:
        self._need(vm_uuid)
        self.live_copies.append((vm_uuid, [index for index, _ in targets]))

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
        self._need(vm_uuid)
        if while_paused is not None:
            await while_paused()
        spec = self.started[vm_uuid]
        for index in disks:
            await _qemu_img_snapshot("-c", tag, spec.disks[index].path)
        self.snapshots_taken.append((vm_uuid, tag, memory))
        return 0.0 if vm_uuid in self.paused else 0.001

    async def delete_snapshot(
        self, vm_uuid: str, tag: str, disks: Sequence[int], timeout: float = 3600
    ) -> None:
        self._need(vm_uuid)
        spec = self.started[vm_uuid]
        for index in disks:
            await _qemu_img_snapshot("-d", tag, spec.disks[index].path)

    async def settle_snapshot_jobs(self, vm_uuid: str, timeout: float = 600) -> None:
        self._need(vm_uuid)

    async def block_resize(self, vm_uuid: str, node: str, size: int) -> None:
        self._need(vm_uuid)
        self.resized[(vm_uuid, node)] = size

    async def kill(self, vm_uuid: str) -> None:
        if vm_uuid in self.started:
            await self._gone(vm_uuid, ObservedState.STOPPED, "forced off")

    async def crash(self, vm_uuid: str, reason: str = "QEMU was killed by SIGKILL") -> None:
        await self._gone(vm_uuid, ObservedState.CRASHED, reason)

    async def wait_stopped(self, vm_uuid: str, timeout: float) -> bool:
        event = self._stopped.get(vm_uuid)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def console(self, vm_uuid: str) -> Console | None:
        return self.consoles.get(vm_uuid)

    def console_log(self, runtime: RuntimePaths) -> bytes:
        return b""

    async def stats(self, vm_uuid: str) -> VmStats | None:
        """Counters that grow steadily from the start: a quarter of each vCPU busy,
        1 MiB/s read and 64 KiB/s written per disk, 100 kB/s each way per TAP NIC."""
        spec = self.started.get(vm_uuid)
        if spec is None:
            return None
        pid, started_at = self.stats_base.get(vm_uuid, (1, time.monotonic()))
        up = time.monotonic() - started_at
        return VmStats(
            pid=pid,
            vcpus=spec.vcpus,
            cpu_seconds=up * spec.vcpus / 4,
            memory_bytes=spec.memory_mib * 1024 * 1024 // 2,
            disks=tuple(
                DiskCounters(f"disk{i}", int(up * 2**20), int(up * 2**16), int(up * 64), int(up))
                for i in range(len(spec.disks))
            ),
            nics=tuple(
                NicCounters(f"net{i}", int(up * 1e5), int(up * 1e5), int(up * 70), int(up * 70))
                for i, nic in enumerate(spec.nics)
                if nic.backend == "tap"
            ),
            uncounted_nics=tuple(
                f"net{i}" for i, nic in enumerate(spec.nics) if nic.backend != "tap"
            ),
        )

    async def detach_all(self) -> None:
        self.started.clear()

    async def cleanup(self, vm_uuid: str, runtime: RuntimePaths) -> None:
        if vm_uuid in self.started:
            raise DriverError("cannot clean up a running VM")


async def _qemu_img_snapshot(action: str, tag: str, path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "snapshot", "--image-opts", "-q", action, tag,
        f"driver=qcow2,file.filename={path}", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await proc.communicate()
    # As QEMU's snapshot-delete job does, deleting skips disks without the snapshot.
    if proc.returncode != 0 and not (action == "-d" and b"not found" in stderr):
        raise DriverError(f"snapshot {action} {tag} failed: {stderr.decode().strip()}")
