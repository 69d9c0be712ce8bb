"""Raw counters of one running QEMU: CPU time and memory from /proc, disk I/O from
QMP `query-blockstats`, NIC traffic from the TAP devices' counters.

A TAP's counters are the host's view: what the host receives from the TAP is
what the guest sent, so rx and tx swap. A NIC on QEMU's user-mode network
(slirp) has no device on the host and QEMU exposes no counters for it: such NICs
are listed in `VmStats.uncounted_nics`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vmhive.hypervisor.base import DiskCounters, NicCounters, VmStats
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor
from vmhive.hypervisor.spec import VmSpec

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# -device ids are disk<N>; a virtio disk's backend hangs below it in the QOM tree.
_DISK_QDEV = re.compile(r"^/machine/peripheral/(disk\d+)(/|$)")
_SYS_NET = Path("/sys/class/net")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    # A process without VmRSS is a zombie: statm's resident pages are then 0 too.
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def parse_blockstats(reply: list[dict[str, Any]]) -> tuple[DiskCounters, ...]:
    """The VM's disks (not its CD-ROMs) from a `query-blockstats` reply.

    With -blockdev a disk's block backend is anonymous: it is named by its
    root node (`node-name` disk<N>) or the device it serves (`qdev`).
    """
    disks: dict[str, DiskCounters] = {}
    for entry in reply:
        name = str(entry.get("node-name") or "")
        if not re.fullmatch(r"disk\d+", name):
            match = _DISK_QDEV.match(str(entry.get("qdev") or ""))
            if match is None:
                continue
            name = match.group(1)
        stats = entry.get("stats") or {}
        disks[name] = DiskCounters(
            name=name,
            read_bytes=int(stats.get("rd_bytes", 0)),
            write_bytes=int(stats.get("wr_bytes", 0)),
            read_ops=int(stats.get("rd_operations", 0)),
            write_ops=int(stats.get("wr_operations", 0)),
        )
    return tuple(disks[name] for name in sorted(disks, key=lambda n: int(n[4:])))


def tap_counters(name: str, tap: str, sys_net: Path = _SYS_NET) -> NicCounters | None:
    """The guest's view of a TAP NIC; None if the TAP is gone."""
    directory = sys_net / tap / "statistics"
    try:
        value = {
            key: int((directory / key).read_text())
            for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
        }
    except (OSError, ValueError):
        return None
    return NicCounters(
        name=name,
        rx_bytes=value["tx_bytes"],
        tx_bytes=value["rx_bytes"],
        rx_packets=value["tx_packets"],
        tx_packets=value["rx_packets"],
    )


async def collect(spec: VmSpec, pid: int, monitor: QmpMonitor) -> VmStats | None:
    """The VM's counters now; None if QEMU went away meanwhile."""
    try:
        cpu = process_cpu_seconds(pid)
        rss = process_rss_bytes(pid)
        disks = parse_blockstats(await monitor.query_blockstats())
    except (OSError, ValueError, MonitorError):
        return None
    nics: list[NicCounters] = []
    uncounted: list[str] = []
    for index, nic in enumerate(spec.nics):
        name = f"net{index}"
        counters = tap_counters(name, nic.tap) if nic.backend == "tap" and nic.tap else None
        if counters is None:
            uncounted.append(name)
        else:
            nics.append(counters)
    return VmStats(
        pid=pid,
        vcpus=spec.vcpus,
        cpu_seconds=cpu,
        memory_bytes=rss,
        disks=disks,
        nics=tuple(nics),
        uncounted_nics=tuple(uncounted),
    )
