"""Raw counters of two consecutive samples -> the rows the round-robin store keeps.

Counters only grow while their source lives. A counter that went down means
its source started again (a restarted QEMU, a disk hot-plugged anew): that
interval has no rate (NaN, a gap in the chart), and the next one is measured
from the new counter. A VM whose QEMU PID changed is a restart as a whole.

Worked example: CPU 10.0 s at t=100 and 11.0 s at t=105 on a 2-vCPU VM:
(11 - 10) / 5 / 2 = 10 %. Then the VM restarts (new PID, 0.2 s at t=110):
NaN for cpu, disks and NICs; memory is a gauge and is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from vmhive.hypervisor.base import DiskCounters, NicCounters, VmStats
from vmhive.metrics.host import HostCounters

NAN = float("nan")

VM_FIELDS = (
    "cpu_percent",  # of the VM's vCPUs: 100 = every vCPU busy (QEMU's own threads count too)
    "memory_bytes",  # resident memory of the QEMU process
    "disk_read_bps",
    "disk_write_bps",
    "disk_read_iops",
    "disk_write_iops",
    "net_rx_bps",  # received by the guest
    "net_tx_bps",  # sent by the guest
)
HOST_FIELDS = (
    "cpu_percent",  # of all host CPUs
    "memory_used_bytes",
    "memory_total_bytes",
    "storage_used_bytes",
    "storage_total_bytes",
)

Sample = tuple[float, VmStats]  # (unix time, counters)
_Device = TypeVar("_Device", DiskCounters, NicCounters)


def rate(before: float, after: float, seconds: float) -> float:
    """Per-second growth of a counter; NaN when it went down (a reset) or no time passed.

    >>> rate(100, 600, 5), rate(600, 100, 5)
    (100.0, nan)
    """
    if seconds <= 0 or after < before:
        return NAN
    return (after - before) / seconds


def vm_row(previous: Sample | None, now: float, stats: VmStats) -> list[float]:
    """The VM_FIELDS values for the interval since `previous` (same order)."""
    memory = float(stats.memory_bytes)
    if previous is None or previous[1].pid != stats.pid:
        return [NAN, memory, NAN, NAN, NAN, NAN, NAN, NAN]
    then, before = previous
    seconds = now - then
    cpu = rate(before.cpu_seconds, stats.cpu_seconds, seconds) * 100 / max(1, stats.vcpus)
    disk = _device_rates(
        before.disks,
        stats.disks,
        seconds,
        lambda d: (d.read_bytes, d.write_bytes, d.read_ops, d.write_ops),
        4,
    )
    net = _device_rates(before.nics, stats.nics, seconds, lambda n: (n.rx_bytes, n.tx_bytes), 2)
    return [cpu, memory, *disk, *net]


def _device_rates(
    before: Sequence[_Device],
    after: Sequence[_Device],
    seconds: float,
    counters: Callable[[_Device], tuple[int, ...]],
    width: int,
) -> list[float]:
    """Summed rates over the devices present in both samples whose counters all
    grew; NaN where no device could be measured (none, or all reset)."""
    earlier = {device.name: counters(device) for device in before}
    totals: list[float] | None = None
    for device in after:
        old = earlier.get(device.name)
        if old is None:
            continue
        rates = [rate(a, b, seconds) for a, b in zip(old, counters(device), strict=True)]
        if any(math.isnan(r) for r in rates):
            continue
        totals = rates if totals is None else [t + r for t, r in zip(totals, rates, strict=True)]
    return totals if totals is not None else [NAN] * width


def host_row(previous: HostCounters | None, now: HostCounters) -> list[float]:
    """The HOST_FIELDS values; CPU use is the busy share of all CPU time since `previous`."""
    cpu = NAN
    if previous is not None:
        busy = now.cpu_busy_seconds - previous.cpu_busy_seconds
        idle = now.cpu_idle_seconds - previous.cpu_idle_seconds
        if busy >= 0 and idle >= 0 and busy + idle > 0:
            cpu = busy * 100 / (busy + idle)
    return [
        cpu,
        float(now.memory_used_bytes),
        float(now.memory_total_bytes),
        float(now.storage_used_bytes),
        float(now.storage_total_bytes),
    ]
