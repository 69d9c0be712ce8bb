"""Benchmark: the cost of one metrics sampling tick, and the memory per VM.

A whole daemon over the in-memory driver (so the numbers are vmhive's own
work: the database query for the VM list, the driver calls, the rate math,
the round-robin updates), with N running VMs, each with 2 disks and a TAP
NIC. For each N:

- tick: wall time of one sampling tick (median and 95th percentile of 30);
- rings/VM: the fixed bytes of one VM's round-robin store (float32 rings);
- heap/VM: what the metrics state really holds per VM (tracemalloc over the
  first ticks: store, previous counters, latest counters, /metrics view);
- persist: writing every store to <data-dir>/metrics, and the file size;
- API: answering one VM's hour / week series, and /metrics.

With QEMU, each running VM adds one QMP round trip (query-blockstats) and a
few /proc and /sys reads to a tick; the ticks' calls run concurrently.

Usage: .venv/bin/python bench/metrics.py [--vms 100,500] [--ticks 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid as uuidlib
from pathlib import Path

from vmhive.config import Settings
from vmhive.daemon import Daemon
from vmhive.hypervisor.fake import FakeDriver
from vmhive.hypervisor.spec import Accel, DiskSpec, NicSpec, RuntimePaths, VmSpec
from vmhive.metrics.service import MetricsService
from vmhive.store.models import Vm


async def populate(daemon: Daemon, driver: FakeDriver, count: int) -> None:
    """`count` running VMs, straight into the database and the fake driver."""
    async with daemon.sessions() as session:
        for i in range(count):
            vm_uuid = str(uuidlib.uuid4())
            name = f"vm{i:04d}"
            spec = VmSpec(
                name=name,
                uuid=vm_uuid,
                generation=2,
                vcpus=2,
                memory_mib=1024,
                machine="pc-q35-7.2",
                accel=Accel.TCG,
                runtime=RuntimePaths(Path("/nonexistent") / vm_uuid),
                disks=(DiskSpec(Path("/nonexistent/a")), DiskSpec(Path("/nonexistent/b"))),
                nics=(NicSpec(mac="52:54:00:00:00:01", backend="tap", tap=f"vh-t{i:011x}"),),
            )
            await driver.start(spec)
            session.add(
                Vm(
                    uuid=vm_uuid,
                    name=name,
                    generation=2,
                    vcpus=2,
                    memory_mib=1024,
                    machine="pc-q35-7.2",
                    state="running",
                    desired_state="running",
                )
            )
        await session.commit()


async def measure(count: int, ticks: int) -> dict[str, float]:
    data_dir = Path(tempfile.mkdtemp(prefix="vh-bm-", dir="/tmp"))
    driver = FakeDriver()
    settings = Settings(data_dir=data_dir, accel="tcg", create_demo=False)
    daemon = Daemon(settings, driver)
    await daemon.start()
    try:
        await daemon.agent.stop_loop()
        await daemon.schedules.stop()
        await daemon.metrics.stop()
        await populate(daemon, driver, count)

        service = MetricsService(settings, daemon.sessions, driver)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        now = time.time()
        for i in range(3):
            await service.tick(now + i * 5)
        heap = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()

        durations = []
        for i in range(ticks):
            began = time.perf_counter()
            await service.tick(now + (i + 3) * 5)
            durations.append(time.perf_counter() - began)
        durations.sort()

        began = time.perf_counter()
        await service.persist()
        persist = time.perf_counter() - began
        files = list((data_dir / "metrics").glob("*-*.rrd"))
        file_size = statistics.mean(p.stat().st_size for p in files)

        some_vm = next(iter(service.vms))
        fetch = {}
        for range_name in ("hour", "week"):
            began = time.perf_counter()
            body = json.dumps(service.vm_series(some_vm, range_name, now=now + 200))
            fetch[range_name] = (time.perf_counter() - began, len(body))
        began = time.perf_counter()
        text = service.prometheus_text()
        prom = time.perf_counter() - began
        return {
            "vms": count,
            "tick_median_ms": statistics.median(durations) * 1000,
            "tick_p95_ms": durations[int(len(durations) * 0.95) - 1] * 1000,
            "rings_per_vm": next(iter(service.vms.values())).nbytes,
            "heap_per_vm": heap / count,
            "persist_ms": persist * 1000,
            "file_bytes": file_size,
            "hour_ms": fetch["hour"][0] * 1000,
            "hour_json": fetch["hour"][1],
            "week_ms": fetch["week"][0] * 1000,
            "prom_ms": prom * 1000,
            "prom_bytes": len(text),
        }
    finally:
        await daemon.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", default="100,500", help="comma-separated VM counts")
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    rows = [asyncio.run(measure(int(n), args.ticks)) for n in args.vms.split(",")]
    print(
        "| VMs | tick median | tick p95 | rings/VM | heap/VM | persist all | file/VM "
        "| hour series (JSON) | week series | /metrics |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['vms']:.0f} | {r['tick_median_ms']:.1f} ms | {r['tick_p95_ms']:.1f} ms "
            f"| {r['rings_per_vm'] / 1024:.0f} KiB | {r['heap_per_vm'] / 1024:.0f} KiB "
            f"| {r['persist_ms']:.0f} ms | {r['file_bytes'] / 1024:.0f} KiB "
            f"| {r['hour_ms']:.1f} ms ({r['hour_json'] / 1024:.0f} KiB) | {r['week_ms']:.1f} ms "
            f"| {r['prom_ms']:.1f} ms ({r['prom_bytes'] / 1024:.0f} KiB) |"
        )


if __name__ == "__main__":
    main()
