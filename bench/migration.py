"""Benchmark: live migration by vmhive's engine against the same migration by hand.

One tiny gen 1 guest of 256 MiB (TCG) is booted from vmhive's argv and then
migrated on and on between QEMUs on this host over a unix socket, each target
started from the same argv plus `incoming_argv()` (``-S -incoming defer``).
Three phases: the guest idle (shared storage); dirtying its memory (``cp`` of
a 32 MiB random file in /dev/shm, over and over; shared storage); dirtying,
with its disk mirrored to a new file over NBD (local storage). In each phase
the migrations alternate (ABBA) between:

* the engine: `LiveMigration(...).run()` with its default settings (downtime
  limit 100 ms, no bandwidth cap, auto-converge);
* by hand: the raw QMP sequence with the same settings -- on the target
  ``migrate-incoming`` (local: ``nbd-server-start``, ``block-export-add``;
  on the source ``blockdev-add`` nbd, ``blockdev-mirror``, BLOCK_JOB_READY);
  on the source ``migrate-set-capabilities`` (events, auto-converge, local:
  pause-before-switchover), ``migrate-set-parameters`` (downtime-limit,
  max-bandwidth), ``migrate``, MIGRATION events until ``completed`` (local: at
  ``pre-switchover``, ``block-job-cancel``, BLOCK_JOB_COMPLETED,
  ``migrate-continue``); ``cont`` on the target; the NBD plumbing removed.

Numbers: QEMU's own (the source's ``query-migrate``: ``total-time``, the RAM
phase, and ``downtime``); the pause, from the source's STOP to the target's
RESUME event (QEMU timestamps: includes the target's start, which QEMU's
downtime leaves out); the wall time from the first command to the guest
running on the target. Medians over the runs, engine/by-hand ratios, and the
best run of each.

Usage: .venv/bin/python bench/migration.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmhive.hypervisor.qemu import process as qemu_process
from vmhive.hypervisor.qemu.argv import build_argv
from vmhive.hypervisor.qemu.migration import (
    LiveMigration,
    MigrationTarget,
    StorageMode,
    plan_local_disks,
    target_spec,
)
from vmhive.hypervisor.qemu.migration.model import UNLIMITED_BANDWIDTH
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor
from vmhive.hypervisor.spec import Accel, DiskSpec, RuntimePaths, VmSpec

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / ".cache" / "images" / "tiny.qcow2"
MEMORY_MIB = 256
SETTLE_S = 10.0
DIRTIER = (
    "dd if=/dev/urandom of=/dev/shm/src bs=1M count=32 2>/dev/null; "
    "(while :; do cp /dev/shm/src /dev/shm/dst; done) & echo dirtier''-on\n"
)


async def boot(root: Path) -> MigrationTarget:
    """The first QEMU: booted normally, wrapped like a target for uniform handling."""
    disk = root / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(disk)],
        check=True,
    )
    spec = VmSpec(
        name="bench",
        uuid="0b6d6967-7261-4e74-9000-0000000000be",
        generation=1,
        vcpus=1,
        memory_mib=MEMORY_MIB,
        machine="pc-i440fx-7.2",
        accel=Accel.TCG,
        runtime=RuntimePaths(root / "q0"),
        disks=(DiskSpec(disk),),
    )
    proc = qemu_process.launch(build_argv(spec), spec.runtime.run_dir, spec.runtime.log_file)
    monitor = QmpMonitor("q0", command_timeout=30)
    async with asyncio.timeout(30):
        while not monitor.connected:
            with contextlib.suppress(MonitorError):
                await monitor.connect(spec.runtime.qmp_socket)
            await asyncio.sleep(0.05)
    return MigrationTarget(spec, monitor, proc)


async def wait_ready(vm: MigrationTarget) -> None:
    """Wait for the guest's shell on the serial console."""
    reader, writer = await asyncio.open_unix_connection(str(vm.spec.runtime.serial_socket))
    seen = b""
    async with asyncio.timeout(120):
        while b"vmhive-guest-ready" not in seen:
            seen += await reader.read(4096)
    writer.close()


async def by_hand(source: QmpMonitor, target: MigrationTarget, local: bool) -> float:
    """The raw QMP sequence, same settings as the engine's defaults."""
    tgt = target.monitor
    uri = target.migration_endpoint.uri()
    await tgt._execute("migrate-incoming", {"uri": uri})
    if local:
        nbd = target.nbd_endpoint
        await tgt._execute("nbd-server-start", {"addr": nbd.legacy_socket_address()})
        export = {"type": "nbd", "id": "disk0", "node-name": "disk0", "name": "disk0"}
        await tgt._execute("block-export-add", {**export, "writable": True})
        client = {"driver": "nbd", "node-name": "nbd0", "export": "disk0"}
        await source._execute("blockdev-add", {**client, "server": nbd.socket_address()})
        mirror = {"job-id": "mirror0", "device": "disk0", "target": "nbd0", "sync": "full"}
        await source._execute("blockdev-mirror", mirror)
        await source.wait_event("BLOCK_JOB_READY", timeout=600)
    caps = [
        {"capability": "events", "state": True},
        {"capability": "auto-converge", "state": True},
        {"capability": "pause-before-switchover", "state": local},
    ]
    await source._execute("migrate-set-capabilities", {"capabilities": caps})
    await source._execute(
        "migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": UNLIMITED_BANDWIDTH}
    )
    await source._execute("migrate", {"uri": uri})
    async with asyncio.timeout(600):
        while True:
            event = await source.wait_event("MIGRATION", timeout=600)
            status = event.data.get("status")
            if status == "pre-switchover":
                await source._execute("block-job-cancel", {"device": "mirror0"})
                await source.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
                await source._execute("migrate-continue", {"state": "pre-switchover"})
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}")
        await tgt._execute("cont")  # the target was started with -S (incoming_argv)
        resumed = await tgt.wait_event("RESUME", timeout=60)
        stopped = await source.wait_event("STOP", timeout=60)
    if local:
        await source._execute("blockdev-del", {"node-name": "nbd0"})
        await tgt._execute("block-export-del", {"id": "disk0", "mode": "hard"})
        await tgt._execute("nbd-server-stop")
    return (resumed.timestamp - stopped.timestamp) * 1000


async def migrate_once(
    root: Path, source: MigrationTarget, index: int, engine: bool, local: bool
) -> tuple[MigrationTarget, dict[str, float]]:
    disks = [root / f"disk{index}.qcow2"] if local else None
    spec = target_spec(source.spec, root / f"q{index}", disks)
    new = await plan_local_disks(source.monitor, source.spec, spec) if local else []
    target = await MigrationTarget.launch(spec, new_disks=new)
    try:
        # Skip what is still queued from this QEMU's own incoming migration.
        while source.monitor.events_pending():
            await source.monitor.next_event(timeout=1)
        started = time.monotonic()
        if engine:
            storage = StorageMode.LOCAL if local else StorageMode.SHARED
            mirrored = [d.node for d in new]
            migration = LiveMigration(source.monitor, target, storage=storage, disks=mirrored)
            pause = (await migration.run()).pause_ms or float("nan")
        else:
            pause = await by_hand(source.monitor, target, local)
            target.commit()  # the guest runs there: its new disk is the VM's now
        wall = time.monotonic() - started
        reply = await source.monitor.query_migrate()
        await source.abort()  # quit the old source
        if local:
            source.spec.disks[0].path.unlink(missing_ok=True)  # the guest's disk moved on
    except BaseException:
        await target.abort()
        raise
    numbers = {
        "total": float(reply["total-time"]),
        "downtime": float(reply["downtime"]),
        "pause": pause,
        "wall": wall * 1000,
        "mib": reply["ram"]["transferred"] / 2**20,
        "passes": float(reply["ram"]["dirty-sync-count"]),
    }
    return target, numbers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main(runs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="vh-mb-", dir="/tmp"))
    vm = await boot(root)
    index = 0
    rows: list[tuple[str, str, float, float, float, float, float]] = []
    try:
        await wait_ready(vm)
        # The first seconds after boot the guest is still busy (and the first
        # migrations measured slower on both sides): let it settle.
        await asyncio.sleep(SETTLE_S)
        for phase in ("idle", "dirtying", "dirtying, local disk"):
            if phase == "dirtying":
                await start_dirtier(vm)
            local = "local" in phase
            for engine in (True, False):  # warm-ups, not counted
                index += 1
                vm, _ = await migrate_once(root, vm, index, engine, local)
            results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
            for run in range(2 * runs):
                engine = run % 4 in (0, 3)  # ABBA order: a drift favours neither side
                index += 1
                vm, numbers = await migrate_once(root, vm, index, engine, local)
                results[engine].append(numbers)
                who = "engine " if engine else "by hand"
                print(
                    f"{phase:20} {who}: total {numbers['total']:.0f} ms, "
                    f"downtime {numbers['downtime']:.0f} ms, pause {numbers['pause']:.0f} ms, wall {numbers['wall']:.0f} ms, "
                    f"{numbers['mib']:.0f} MiB sent in {numbers['passes']:.0f} passes",
                    flush=True,
                )
            for key in ("total", "downtime", "pause", "wall"):
                ours = [r[key] for r in results[True]]
                theirs = [r[key] for r in results[False]]
                ratio = median(ours) / median(theirs)
                rows.append(
                    (phase, key, median(ours), median(theirs), ratio, min(ours), min(theirs))
                )
    finally:
        await vm.abort()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nmedians of {runs} runs each, {MEMORY_MIB} MiB guest, TCG")
    print("| guest | metric | engine | by hand | ratio | best: engine / by hand |")
    print("|---|---|---|---|---|---|")
    for phase, key, engine_ms, hand_ms, ratio, best, best_hand in rows:
        print(
            f"| {phase} | {key} | {engine_ms:.0f} ms | {hand_ms:.0f} ms | {ratio:.2f} "
            f"| {best:.0f} / {best_hand:.0f} ms |"
        )


async def start_dirtier(vm: MigrationTarget) -> None:
    """Type the dirtier on the serial console; wait until its copy loop runs."""
    reader, writer = await asyncio.open_unix_connection(str(vm.spec.runtime.serial_socket))
    writer.write(DIRTIER.encode())
    await writer.drain()
    seen = b""
    async with asyncio.timeout(120):
        while b"dirtier-on" not in seen:
            seen += await reader.read(4096)
    writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.runs))
