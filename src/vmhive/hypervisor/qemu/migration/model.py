"""The data of a live migration: settings, addresses, progress and final numbers.

Pure: nothing here does I/O, so the policy (when to switch to post-copy, how
QEMU's `query-migrate` reply reads) is testable on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from vmhive.hypervisor.spec import RuntimePaths, VmSpec

#: What `max-bandwidth` is set to for "no cap": QEMU 7.2 has no "unlimited" value,
#: and 1 PiB/s is beyond any link (libvirt does the same with its own maximum).
UNLIMITED_BANDWIDTH: Final = 1 << 50

#: `query-migrate` statuses after which nothing more happens.
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})


class MigrationError(Exception):
    """The migration did not happen; the source still runs the guest."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request; the source still runs the guest."""


class StorageMode(StrEnum):
    #: Both QEMUs open the same disk files: only RAM and device state move.
    SHARED = "shared"
    #: The target has its own, new disk files: they are mirrored over NBD first.
    LOCAL = "local"


@dataclass(frozen=True)
class Endpoint:
    """Where the target listens: a unix socket (same host) or a TCP address."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.host is None or self.port is None):
            raise ValueError("an endpoint is a unix socket path or a host and port, not both")

    @classmethod
    def unix(cls, path: Path) -> Endpoint:
        return cls(path=path)

    @classmethod
    def tcp(cls, host: str, port: int) -> Endpoint:
        return cls(host=host, port=port)

    def uri(self) -> str:
        """The migration URI (``migrate`` / ``migrate-incoming``)."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def socket_address(self) -> dict[str, Any]:
        """A flat SocketAddress (``blockdev-add`` of an NBD client)."""
        if self.path is not None:
            return {"type": "unix", "path": str(self.path)}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def legacy_socket_address(self) -> dict[str, Any]:
        """A SocketAddressLegacy (``nbd-server-start`` in QEMU 7.2)."""
        flat = self.socket_address()
        return {"type": flat.pop("type"), "data": flat}


@dataclass(frozen=True)
class MigrationSettings:
    """How a migration is run.

    Post-copy (off by default) starts the guest on the target before all of
    its RAM has moved, when pre-copy has not converged after
    `postcopy_after_passes` passes over RAM or `postcopy_after_s` seconds of
    RAM migration, whichever comes first. From then on a failure cannot be
    rolled back: the guest's state is split between the two hosts.
    """

    downtime_limit_ms: int = 100
    bandwidth: int | None = None  # bytes/s for RAM and disk copy; None: no cap
    auto_converge: bool = True
    multifd_channels: int = 0  # 0: one migration stream; >= 1: multifd with that many
    postcopy: bool = False
    postcopy_after_passes: int = 5
    postcopy_after_s: float = 30.0
    deadline_s: float = 3600.0  # the whole migration, disks included
    switchover_deadline_s: float = 60.0  # mirrors' final sync + device state + target start
    progress_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.downtime_limit_ms <= 2000_000:
            raise ValueError("downtime limit must be 1 ms to 2000 s")
        if self.bandwidth is not None and self.bandwidth < 1024:
            raise ValueError("bandwidth cap must be at least 1024 bytes/s")
        if not 0 <= self.multifd_channels <= 255:
            raise ValueError("multifd channels must be 0 (off) to 255")
        if self.postcopy and self.multifd_channels:
            raise ValueError("QEMU 7.2 cannot combine post-copy with multifd")
        if self.postcopy_after_passes < 1 or self.postcopy_after_s <= 0:
            raise ValueError("post-copy needs at least one pass and a positive delay")
        if min(self.deadline_s, self.switchover_deadline_s, self.progress_interval_s) <= 0:
            raise ValueError("deadlines and the progress interval must be positive")

    def capabilities(self, *, source: bool, pause_before_switchover: bool) -> dict[str, bool]:
        """`migrate-set-capabilities` for one side. multifd and post-copy must match on
        both sides; the others only mean something on the source."""
        caps = {
            "events": True,
            "multifd": self.multifd_channels > 0,
            "postcopy-ram": self.postcopy,
        }
        if source:
            caps["auto-converge"] = self.auto_converge
            caps["pause-before-switchover"] = pause_before_switchover
        return caps

    def parameters(self, *, source: bool) -> dict[str, object]:
        """`migrate-set-parameters` for one side."""
        params: dict[str, object] = {}
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        if source:
            params["downtime-limit"] = self.downtime_limit_ms
            params["max-bandwidth"] = self.bandwidth or UNLIMITED_BANDWIDTH
        return params


@dataclass(frozen=True)
class MirrorProgress:
    """One disk's copy to the target (a `blockdev-mirror` job)."""

    disk: str  # the source's node name, e.g. "disk0"
    copied: int  # bytes (QEMU's offset)
    total: int  # bytes (QEMU's len; grows while the guest dirties the disk)
    ready: bool  # in sync: every guest write now goes to both sides


@dataclass(frozen=True)
class MigrationProgress:
    """A snapshot of a running migration, for display."""

    phase: str  # "disks" (mirroring), "ram", "switchover", "completed", ...
    status: str  # QEMU's migration status ("none" while the disks are copied)
    elapsed_s: float
    transferred: int = 0  # bytes of RAM sent so far
    remaining: int = 0  # bytes of RAM still dirty
    total: int = 0  # bytes of guest RAM
    dirty_rate: int = 0  # bytes/s the guest dirties
    expected_downtime_ms: int | None = None
    passes: int = 0  # dirty-sync-count: passes over RAM so far
    mirrors: tuple[MirrorProgress, ...] = ()


@dataclass(frozen=True)
class MigrationStats:
    """The final numbers, as QEMU's `query-migrate` on the source reports them."""

    status: str
    total_time_ms: int
    downtime_ms: int | None
    setup_time_ms: int | None
    transferred: int
    total: int
    passes: int
    postcopy: bool  # the switch to post-copy happened
    #: From the source's STOP event to the target's RESUME event (QEMU timestamps, so
    #: across hosts only as exact as their clocks): the guest's whole pause, including
    #: the target's start, which QEMU's `downtime` leaves out. None if unknown.
    pause_ms: float | None
    disks_s: float  # wall time of the disk mirroring phase (0 for shared storage)
    wall_s: float  # wall time of the whole migration as the engine saw it


def progress_from_query(
    reply: Mapping[str, Any], *, phase: str, elapsed_s: float, mirrors: Sequence[MirrorProgress]
) -> MigrationProgress:
    """Read a `query-migrate` reply.

    >>> reply = {"status": "active", "expected-downtime": 12,
    ...          "ram": {"transferred": 10, "remaining": 5, "total": 30,
    ...                  "dirty-pages-rate": 2, "page-size": 4096, "dirty-sync-count": 3}}
    >>> p = progress_from_query(reply, phase="ram", elapsed_s=1.0, mirrors=())
    >>> (p.transferred, p.remaining, p.dirty_rate, p.expected_downtime_ms, p.passes)
    (10, 5, 8192, 12, 3)
    """
    ram = reply.get("ram") or {}
    expected = reply.get("expected-downtime")
    return MigrationProgress(
        phase=phase,
        status=str(reply.get("status", "none")),
        elapsed_s=elapsed_s,
        transferred=int(ram.get("transferred", 0)),
        remaining=int(ram.get("remaining", 0)),
        total=int(ram.get("total", 0)),
        dirty_rate=int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096)),
        expected_downtime_ms=int(expected) if isinstance(expected, int) else None,
        passes=int(ram.get("dirty-sync-count", 0)),
        mirrors=tuple(mirrors),
    )


def stats_from_query(
    reply: Mapping[str, Any],
    *,
    postcopy: bool,
    pause_ms: float | None,
    disks_s: float,
    wall_s: float,
) -> MigrationStats:
    ram = reply.get("ram") or {}

    def opt(key: str) -> int | None:
        value = reply.get(key)
        return int(value) if isinstance(value, int) else None

    return MigrationStats(
        status=str(reply.get("status", "none")),
        total_time_ms=opt("total-time") or 0,
        downtime_ms=opt("downtime"),
        setup_time_ms=opt("setup-time"),
        transferred=int(ram.get("transferred", 0)),
        total=int(ram.get("total", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        postcopy=postcopy,
        pause_ms=pause_ms,
        disks_s=disks_s,
        wall_s=wall_s,
    )


def should_start_postcopy(settings: MigrationSettings, passes: int, ram_phase_s: float) -> bool:
    """Post-copy is due when pre-copy has had its passes or its time.

    >>> s = MigrationSettings(postcopy=True, postcopy_after_passes=3, postcopy_after_s=20)
    >>> should_start_postcopy(s, 2, 5.0), should_start_postcopy(s, 3, 5.0)
    (False, True)
    >>> should_start_postcopy(s, 1, 20.0), should_start_postcopy(MigrationSettings(), 9, 99)
    (True, False)
    """
    if not settings.postcopy:
        return False
    return passes >= settings.postcopy_after_passes or ram_phase_s >= settings.postcopy_after_s


def incoming_argv() -> list[str]:
    """What a target QEMU needs on top of the VM's own argv: wait for `migrate-incoming`
    (so capabilities can be set first) instead of booting, and keep the vCPUs stopped
    once the state is in (``-S``) until the engine, having seen the source complete,
    sends ``cont``. A target that dies before then has not run the guest, so the
    source can safely resume it. (The driver's own ``-S`` may be there too.)"""
    return ["-S", "-incoming", "defer"]


def target_spec(
    source: VmSpec,
    run_dir: Path,
    disk_paths: Sequence[Path] | None = None,
    firmware_vars: Path | None = None,
) -> VmSpec:
    """The spec a target QEMU is started from: the same VM (uuid, MACs, devices) with
    its own runtime directory and, for local storage, its own disk files (and UEFI
    variables file)."""
    spec = dataclasses.replace(source, runtime=RuntimePaths(run_dir))
    if firmware_vars is not None and source.firmware is not None:
        firmware = dataclasses.replace(source.firmware, vars=firmware_vars)
        spec = dataclasses.replace(spec, firmware=firmware)
    if disk_paths is not None:
        if len(disk_paths) != len(source.disks):
            raise ValueError(f"{len(source.disks)} disk path(s) needed, got {len(disk_paths)}")
        disks = tuple(
            dataclasses.replace(d, path=p) for d, p in zip(source.disks, disk_paths, strict=True)
        )
        spec = dataclasses.replace(spec, disks=disks)
    return spec
