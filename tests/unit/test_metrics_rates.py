"""Counters -> rates (with resets), host readers, and the QEMU counter parsers."""

from __future__ import annotations

import math
import os
from pathlib import Path

from vmhive.hypervisor.base import DiskCounters, NicCounters, VmStats
from vmhive.hypervisor.qemu.stats import (
    parse_blockstats,
    process_cpu_seconds,
    process_rss_bytes,
    tap_counters,
)
from vmhive.metrics import host
from vmhive.metrics.rates import VM_FIELDS, host_row, rate, vm_row


def stats(
    pid: int = 100,
    cpu: float = 10.0,
    disk: tuple[int, int, int, int] = (0, 0, 0, 0),
    nic: tuple[int, int] | None = (0, 0),
    vcpus: int = 2,
) -> VmStats:
    return VmStats(
        pid=pid,
        vcpus=vcpus,
        cpu_seconds=cpu,
        memory_bytes=256 << 20,
        disks=(DiskCounters("disk0", *disk),),
        nics=() if nic is None else (NicCounters("net0", nic[0], nic[1], 0, 0),),
    )


def row(values: list[float]) -> dict[str, float]:
    return dict(zip(VM_FIELDS, values, strict=True))


def test_rates_over_the_interval() -> None:
    before = stats(cpu=10.0, disk=(1000, 0, 10, 0), nic=(0, 500))
    after = stats(cpu=11.0, disk=(6000, 2500, 20, 5), nic=(5000, 1500))
    r = row(vm_row((100.0, before), 105.0, after))
    assert r["cpu_percent"] == 10.0  # 1 s of CPU in 5 s on 2 vCPUs
    assert r["memory_bytes"] == 256 << 20
    assert (r["disk_read_bps"], r["disk_write_bps"]) == (1000.0, 500.0)
    assert (r["disk_read_iops"], r["disk_write_iops"]) == (2.0, 1.0)
    assert (r["net_rx_bps"], r["net_tx_bps"]) == (1000.0, 200.0)


def test_first_sample_and_restart_have_no_rates_but_memory() -> None:
    first = row(vm_row(None, 100.0, stats()))
    assert math.isnan(first["cpu_percent"]) and first["memory_bytes"] == 256 << 20
    # A new QEMU (other PID) starts its counters at zero: no rate across it.
    restarted = row(vm_row((100.0, stats(cpu=50.0)), 105.0, stats(pid=200, cpu=0.3)))
    assert all(math.isnan(restarted[f]) for f in VM_FIELDS if f != "memory_bytes")
    assert restarted["memory_bytes"] == 256 << 20


def test_a_counter_that_went_down_is_a_reset_of_that_device_only() -> None:
    before = VmStats(
        100,
        1,
        1.0,
        1,
        disks=(DiskCounters("disk0", 100, 0, 1, 0), DiskCounters("disk1", 0, 0, 0, 0)),
    )
    # disk0 was unplugged and plugged again (counters restart); disk1 read 500 B.
    after = VmStats(
        100,
        1,
        2.0,
        1,
        disks=(DiskCounters("disk0", 10, 0, 1, 0), DiskCounters("disk1", 500, 0, 1, 0)),
    )
    r = row(vm_row((0.0, before), 1.0, after))
    assert r["disk_read_bps"] == 500.0 and r["cpu_percent"] == 100.0
    assert math.isnan(r["net_rx_bps"])  # no NIC with counters
    assert math.isnan(rate(10, 5, 1)) and math.isnan(rate(0, 5, 0))


def test_cpu_seconds_going_back_gives_no_cpu_rate() -> None:
    r = row(vm_row((0.0, stats(cpu=5.0)), 5.0, stats(cpu=4.0)))
    assert math.isnan(r["cpu_percent"])


def test_host_rows() -> None:
    a = host.HostCounters(4, 100.0, 300.0, 8 << 30, 2 << 30, 100 << 30, 40 << 30)
    b = host.HostCounters(4, 103.0, 309.0, 8 << 30, 3 << 30, 100 << 30, 41 << 30)
    assert math.isnan(host_row(None, a)[0])
    assert host_row(a, b) == [25.0, 3 << 30, 8 << 30, 41 << 30, 100 << 30]


def test_host_readers_on_this_host(tmp_path: Path) -> None:
    counters = host.read_host([tmp_path, tmp_path / "missing", Path("/")])
    assert counters.cpus == os.cpu_count()
    assert counters.cpu_busy_seconds > 0 and counters.cpu_idle_seconds > 0
    assert 0 < counters.memory_used_bytes < counters.memory_total_bytes
    assert 0 < counters.storage_used_bytes <= counters.storage_total_bytes
    # The same filesystem twice counts once.
    once = host.storage_usage([Path("/")])
    assert host.storage_usage([Path("/"), Path("/")]) == once


def test_process_counters_of_this_process() -> None:
    cpu = process_cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # burn some CPU
    assert process_cpu_seconds(os.getpid()) > cpu
    assert process_rss_bytes(os.getpid()) > 10 << 20


def test_blockstats_reply_keeps_disks_not_cdroms() -> None:
    # As QEMU 7.2 answers for a q35 VM with -blockdev (trimmed).
    reply = [
        {
            "device": "",
            "qdev": "/machine/peripheral/disk0/virtio-backend",
            "node-name": "disk0",
            "stats": {"rd_bytes": 5000, "wr_bytes": 700, "rd_operations": 40, "wr_operations": 3},
        },
        {"device": "", "qdev": "/machine/peripheral/cdrom0", "stats": {"rd_bytes": 9}},
        {
            "device": "",
            "qdev": "/machine/peripheral/disk10",
            "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4},
        },
        {
            "device": "",
            "qdev": "/machine/peripheral/disk2/virtio-backend",
            "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0},
        },
    ]
    disks = parse_blockstats(reply)
    assert [d.name for d in disks] == ["disk0", "disk2", "disk10"]
    assert disks[0] == DiskCounters("disk0", 5000, 700, 40, 3)
    assert disks[2] == DiskCounters("disk10", 1, 2, 3, 4)


def test_a_taps_receive_is_the_guests_transmit(tmp_path: Path) -> None:
    statistics = tmp_path / "vh-tabc" / "statistics"
    statistics.mkdir(parents=True)
    for key, value in {
        "rx_bytes": 100,
        "tx_bytes": 2000,
        "rx_packets": 1,
        "tx_packets": 20,
    }.items():
        (statistics / key).write_text(f"{value}\n")
    assert tap_counters("net0", "vh-tabc", tmp_path) == NicCounters("net0", 2000, 100, 20, 1)
    assert tap_counters("net1", "vh-gone", tmp_path) is None
