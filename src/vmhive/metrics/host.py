"""The host's raw counters: CPU time from /proc/stat, memory from /proc/meminfo,
storage from statvfs of the directories vmhive writes to."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class HostCounters:
    cpus: int
    cpu_busy_seconds: float  # all CPUs together, since boot
    cpu_idle_seconds: float  # idle + iowait
    memory_total_bytes: int
    memory_used_bytes: int  # total - available: what the kernel cannot hand out
    storage_total_bytes: int
    storage_used_bytes: int


def parse_proc_stat(text: str) -> tuple[float, float]:
    """(busy, idle) seconds of all CPUs from /proc/stat's first line.

    guest and guest_nice are already counted in user and nice, so only the first
    eight columns add up; iowait counts as idle (the CPU was free to run others).

    >>> parse_proc_stat("cpu  100 0 50 800 50 0 0 0 30 0\\n")
    (1.5, 8.5)
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:9]]
            idle = ticks[3] + ticks[4]
            return (sum(ticks) - idle) / CLOCK_TICKS, idle / CLOCK_TICKS
    raise ValueError("no 'cpu' line in /proc/stat")


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo; used = MemTotal - MemAvailable.

    >>> parse_meminfo("MemTotal: 1000 kB\\nMemFree: 100 kB\\nMemAvailable: 600 kB\\n")
    (1024000, 409600)
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    total = values["MemTotal"]
    return total, total - values.get("MemAvailable", values.get("MemFree", 0))


def storage_usage(paths: Iterable[Path]) -> tuple[int, int]:
    """(total, used) bytes of the filesystems holding `paths`, each counted once."""
    seen: set[int] = set()
    total = used = 0
    for path in paths:
        try:
            device = path.stat().st_dev
            fs = os.statvfs(path)
        except OSError:
            continue
        if device in seen:
            continue
        seen.add(device)
        total += fs.f_blocks * fs.f_frsize
        used += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    return total, used


def read_host(storage_paths: Iterable[Path]) -> HostCounters:
    busy, idle = parse_proc_stat(Path("/proc/stat").read_text())
    mem_total, mem_used = parse_meminfo(Path("/proc/meminfo").read_text())
    disk_total, disk_used = storage_usage(storage_paths)
    return HostCounters(
        cpus=os.cpu_count() or 1,
        cpu_busy_seconds=busy,
        cpu_idle_seconds=idle,
        memory_total_bytes=mem_total,
        memory_used_bytes=mem_used,
        storage_total_bytes=disk_total,
        storage_used_bytes=disk_used,
    )
