"""The hypervisor seam: what the services above may ask of a driver.

Nothing above this interface builds a command line or speaks QMP. A driver
reports observed state changes through a callback; it never writes the
database itself.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmhive.hypervisor.spec import NicSpec, RuntimePaths, VmSpec


class ObservedState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"


StateCallback = Callable[[str, ObservedState, str], Awaitable[None]]


class DriverError(Exception):
    """A hypervisor operation failed; the message is meant for the user."""


class NotRunning(DriverError):
    pass


@dataclass(frozen=True)
class AdoptResult:
    adopted: bool
    state: ObservedState
    reason: str
    pid: int | None = None


@dataclass(frozen=True)
class DiskCounters:
    """One disk's cumulative I/O since its QEMU started (QMP query-blockstats)."""

    name: str  # the QEMU device id, "disk0", "disk1", ...
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


@dataclass(frozen=True)
class NicCounters:
    """One NIC's cumulative traffic as the guest sees it (received = into the guest)."""

    name: str  # "net0", "net1", ...
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass(frozen=True)
class VmStats:
    """Raw counters of one running VM; the metrics sampler turns them into rates.

    `pid` tells a restarted QEMU (counters back at zero) from the one sampled before.
    """

    pid: int
    vcpus: int
    cpu_seconds: float  # user + system time of the whole QEMU process
    memory_bytes: int  # resident set of the QEMU process
    disks: tuple[DiskCounters, ...] = ()
    nics: tuple[NicCounters, ...] = ()
    uncounted_nics: tuple[str, ...] = ()  # NICs without counters (user-mode networking)


class Console(ABC):
    """A VM's live serial console as the API layer sees it: output fans out to
    every subscriber, with a cap per subscriber so a stalled viewer cannot
    grow the daemon's memory."""

    MAX_QUEUED_CHUNKS = 1000

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(queue)

    def _broadcast(self, chunk: bytes) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() < self.MAX_QUEUED_CHUNKS:
                queue.put_nowait(chunk)

    def _hang_up(self) -> None:
        for queue in list(self._subscribers):
            queue.put_nowait(None)

    @abstractmethod
    async def write(self, data: bytes) -> None: ...


class Driver(ABC):
    """One host's hypervisor. `capabilities` says which optional operations work."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.on_state: StateCallback | None = None

    async def _report(self, vm_uuid: str, state: ObservedState, reason: str = "") -> None:
        if self.on_state is not None:
            await self.on_state(vm_uuid, state, reason)

    @abstractmethod
    async def start(self, spec: VmSpec, *, snapshot: str | None = None) -> int:
        """Start the VM; returns the PID once its monitor answers.

        With `snapshot`, the guest resumes where internal snapshot `snapshot` (one
        taken with memory) left it: its disks are reverted and its RAM and device
        state loaded before the vCPUs run.
        """

    @abstractmethod
    async def adopt(self, spec: VmSpec) -> AdoptResult:
        """Re-attach to a VM left running by an earlier daemon, if it still runs."""

    @abstractmethod
    def is_running(self, vm_uuid: str) -> bool: ...

    @abstractmethod
    def pid(self, vm_uuid: str) -> int | None: ...

    @abstractmethod
    async def powerdown(self, vm_uuid: str) -> None:
        """Press the ACPI power button."""

    @abstractmethod
    async def reset(self, vm_uuid: str) -> None: ...

    @abstractmethod
    async def pause(self, vm_uuid: str) -> None: ...

    @abstractmethod
    async def resume(self, vm_uuid: str) -> None: ...

    @abstractmethod
    async def hotplug_disk(self, vm_uuid: str, index: int, path: Path, fmt: str) -> None:
        """Add disk `index` to a running VM (generation 2)."""

    @abstractmethod
    async def unplug_disk(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        """Remove disk `index` from a running VM once the guest has let go of it."""

    @abstractmethod
    async def block_resize(self, vm_uuid: str, node: str, size: int) -> None:
        """Grow a disk of a running VM; the guest sees the new capacity."""

    @abstractmethod
    async def freeze_filesystems(self, vm_uuid: str) -> int | None:
        """Freeze the guest's filesystems through its agent: how many, or None (no agent)."""

    @abstractmethod
    async def thaw_filesystems(self, vm_uuid: str) -> int:
        """Thaw what `freeze_filesystems` froze."""

    @abstractmethod
    async def hotplug_nic(self, vm_uuid: str, index: int, nic: NicSpec) -> None:
        """Add NIC `index` to a running VM (generation 2)."""

    @abstractmethod
    async def unplug_nic(self, vm_uuid: str, index: int, timeout: float = 30.0) -> None:
        """Remove NIC `index` from a running VM once the guest has let go of it."""

    @abstractmethod
    async def set_nic_link(self, vm_uuid: str, index: int, up: bool) -> None:
        """Link up or down on NIC `index` of a running VM."""

    @abstractmethod
    async def copy_disks_live(
        self,
        vm_uuid: str,
        targets: Sequence[tuple[int, Path]],
        progress: Callable[[int], Awaitable[None]] | None = None,
        timeout: float = 6 * 3600,
    ) -> None:
        """Copy disks (index, new qcow2 file of the same size) of a running VM into
        one crash-consistent point-in-time copy, the guest running on."""

    @abstractmethod
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
        """Internal snapshot `tag` of the given disks of a running VM, all at one
        instant; with `memory` also its RAM and device state (into the first disk).

        The guest is paused for it and `while_paused` runs inside that pause (to copy
        what QEMU does not snapshot itself). Returns how long the vCPUs stood still,
        in seconds (0 for a VM that was paused already).
        """

    @abstractmethod
    async def delete_snapshot(
        self, vm_uuid: str, tag: str, disks: Sequence[int], timeout: float = 3600
    ) -> None:
        """Delete internal snapshot `tag` from those of the running VM's disks that have it."""

    @abstractmethod
    async def settle_snapshot_jobs(self, vm_uuid: str, timeout: float = 600) -> None:
        """Wait for the snapshot jobs an earlier daemon left running inside the VM's
        QEMU to end, and clear them (crash recovery)."""

    @abstractmethod
    async def insert_media(self, vm_uuid: str, drive: int, iso: Path) -> None:
        """Put an ISO into CD-ROM drive `drive` of a running VM."""

    @abstractmethod
    async def eject_media(self, vm_uuid: str, drive: int) -> None: ...

    @abstractmethod
    async def kill(self, vm_uuid: str) -> None:
        """Stop the VM at once, as pulling the plug; returns when it is gone."""

    @abstractmethod
    async def wait_stopped(self, vm_uuid: str, timeout: float) -> bool: ...

    @abstractmethod
    def console(self, vm_uuid: str) -> Console | None: ...

    @abstractmethod
    def console_log(self, runtime: RuntimePaths) -> bytes:
        """The captured serial output; kept after the VM stops, until it is deleted."""

    async def block_node_sizes(self, vm_uuid: str) -> dict[str, int]:
        raise DriverError("this driver cannot migrate VMs")

    async def migrate_out(
        self,
        vm_uuid: str,
        target: Any,
        *,
        storage: Any,
        disks: Sequence[str],
        settings: Any,
        on_progress: Any = None,
    ) -> Any:
        """Move the running guest to `target` (see the QEMU driver)."""
        raise DriverError("this driver cannot migrate VMs")

    def cancel_migration(self, vm_uuid: str) -> bool:
        return False

    async def abandon_migration(self, vm_uuid: str) -> str:
        raise DriverError("this driver cannot migrate VMs")

    async def fence(self, runtime: RuntimePaths) -> str | None:
        """Make sure no guest of a VM another node now owns runs here (this node
        was thought dead and the VM moved away). What it did, or None."""
        return None

    @abstractmethod
    async def detach_all(self) -> None:
        """Let go of every VM without touching it (daemon shutdown)."""

    @abstractmethod
    async def cleanup(self, vm_uuid: str, runtime: RuntimePaths) -> None:
        """Remove a stopped VM's run directory (sockets, pidfile, logs)."""

    async def stats(self, vm_uuid: str) -> VmStats | None:
        """The VM's raw counters now; None when it is not running or has none."""
        return None
