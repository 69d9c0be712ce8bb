"""Live migration between two real QEMUs on this host, driven by the engine.

Every QEMU runs the argv vmhive builds (`build_argv`), the target with
`incoming_argv()` on top; the tiny guest prints a counter and its uptime on
the serial console, so a migration that reset or lost the guest shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.functional.qemu_boot import HAVE_QEMU
from vmhive.hypervisor.qemu import process as qemu_process
from vmhive.hypervisor.qemu.argv import build_argv
from vmhive.hypervisor.qemu.migration import (
    LiveMigration,
    MigrationCancelled,
    MigrationError,
    MigrationProgress,
    MigrationSettings,
    MigrationTarget,
    NewDisk,
    StorageMode,
    plan_local_disks,
    target_spec,
)
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor
from vmhive.hypervisor.spec import Accel, DiskSpec, NicSpec, RuntimePaths, VmSpec

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed"),
]

MEMORY_MIB = 128
MAC = "52:54:00:6d:69:67"
BOOT_DEADLINE = 90.0
WAIT_DEADLINE = 30.0
MIGRATION_DEADLINE = 120.0
# A bandwidth cap that makes the 256 MiB disk mirror take ~8 s (zeroes count too)
# and the RAM phase ~2 s: slow enough to interrupt either.
SLOW = 32 * 1024 * 1024
# A tick line every 0.2 s: the counter and the guest's uptime.
TICKER = (
    'i=0; while :; do i=$((i+1)); read up x </proc/uptime; echo "tick $i $up"; sleep 0.2; done &'
)
TICK_RE = re.compile(rb"tick (\d+) (\d+\.\d+)\r?\n")


class Console:
    """One QEMU's serial socket: all it printed so far, and a way to type."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.data = bytearray()
        self._writer = writer
        self._more = asyncio.Event()
        self._task = asyncio.create_task(self._read(reader))

    @classmethod
    async def open(cls, path: Path) -> Console:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
        return cls(reader, writer)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.data += chunk
            self._more.set()

    async def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> re.Match[bytes]:
        regex = re.compile(pattern, re.DOTALL)
        async with asyncio.timeout(timeout):
            while (match := regex.search(self.data, start)) is None:
                self._more.clear()
                await self._more.wait()
        return match

    async def type(self, text: str) -> None:
        self._writer.write(text.encode())
        await self._writer.drain()

    async def run(self, command: str, timeout: float = WAIT_DEADLINE) -> str:
        """Type `command`; return what it printed (between two markers)."""
        token = f"m{len(self.data)}x"
        start = len(self.data)
        await self.type(f"echo {token}''B; {command}; echo {token}''E\n")
        match = await self.wait_for(rf"{token}B\r?\n(.*?){token}E".encode(), timeout, start)
        lines = match.group(1).decode(errors="replace").splitlines()
        return "\n".join(ln for ln in lines if not ln.startswith("tick ")).strip()

    def ticks(self) -> list[tuple[int, float]]:
        return [(int(m[1]), float(m[2])) for m in TICK_RE.finditer(self.data)]

    async def tick_after(self, count: int, timeout: float = WAIT_DEADLINE) -> tuple[int, float]:
        """The first tick whose counter is above `count`."""
        async with asyncio.timeout(timeout):
            while True:
                later = [t for t in self.ticks() if t[0] > count]
                if later:
                    return later[0]
                self._more.clear()
                await self._more.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._task
        self._writer.close()


@dataclass
class Guest:
    """A QEMU running the guest: its spec, process, monitor and console."""

    spec: VmSpec
    process: qemu_process.QemuProcess
    monitor: QmpMonitor
    console: Console

    async def quit(self) -> None:
        await self.monitor.quit()
        assert await self.process.wait(WAIT_DEADLINE), "QEMU did not quit"


@dataclass
class Lab:
    """A short temp dir (unix socket paths) and every QEMU started in it."""

    root: Path
    guests: list[Guest] = field(default_factory=list)
    targets: list[MigrationTarget] = field(default_factory=list)

    def spec(self, *disks: Path) -> VmSpec:
        return VmSpec(
            name="mig",
            uuid="0b6d6967-7261-4e74-9000-000000000001",
            generation=1,
            vcpus=1,
            memory_mib=MEMORY_MIB,
            machine="pc-i440fx-7.2",
            accel=Accel.TCG,
            runtime=RuntimePaths(self.root / "a"),
            disks=tuple(DiskSpec(d) for d in disks),
            nics=(NicSpec(mac=MAC),),
        )

    async def boot(self, image_dir: Path, *extra: Path) -> Guest:
        """The tiny guest on an overlay of the image, with `extra` disks after it."""
        disk = self.root / "a-disk.qcow2"
        image = image_dir / "tiny.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(disk)],
            check=True,
            timeout=30,
        )
        spec = self.spec(disk, *extra)
        proc = qemu_process.launch(build_argv(spec), spec.runtime.run_dir, spec.runtime.log_file)
        monitor = QmpMonitor("source")
        async with asyncio.timeout(WAIT_DEADLINE):
            while not spec.runtime.serial_socket.exists() or not monitor.connected:
                assert not proc.exited.is_set(), qemu_process.tail(spec.runtime.log_file)
                with contextlib.suppress(MonitorError, OSError):
                    await monitor.connect(spec.runtime.qmp_socket)
                await asyncio.sleep(0.05)
        guest = Guest(spec, proc, monitor, await Console.open(spec.runtime.serial_socket))
        self.guests.append(guest)
        await guest.console.wait_for(rb"vmhive-guest-ready", BOOT_DEADLINE)
        return guest

    async def target(self, source: VmSpec, name: str, *, local: QmpMonitor | None = None) -> Guest:
        """A target QEMU; with `local` (the source's monitor), with new, empty disks."""
        disks = [self.root / f"{name}-disk.qcow2"] if local else None
        spec = target_spec(source, self.root / name, disks)
        new = await plan_local_disks(local, source, spec) if local else []
        target = await MigrationTarget.launch(spec, new_disks=new)
        self.targets.append(target)
        console = await Console.open(spec.runtime.serial_socket)
        guest = Guest(spec, target.process, target.monitor, console)
        self.guests.append(guest)
        return guest

    async def close(self) -> None:
        for guest in self.guests:
            await guest.console.close()
            guest.process.send_signal(signal.SIGKILL)
            await guest.process.wait(WAIT_DEADLINE)
            await guest.monitor.close()


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="vh-mig-", dir="/tmp"))
    lab = Lab(root)
    try:
        yield lab
    finally:
        await lab.close()
        shutil.rmtree(root, ignore_errors=True)


async def start_ticker(guest: Guest) -> tuple[int, float]:
    await guest.console.type(f"{TICKER}\n")
    return await guest.console.tick_after(2)


async def migrate(
    source: Guest,
    target: Guest,
    lab: Lab,
    *,
    settings: MigrationSettings | None = None,
    on_progress: Callable[[MigrationProgress], None] | None = None,
) -> LiveMigration:
    handle = next(t for t in lab.targets if t.monitor is target.monitor)
    storage = StorageMode.SHARED
    disks: list[str] = []
    if handle.created_files:
        storage, disks = StorageMode.LOCAL, ["disk0"]
    return LiveMigration(
        source.monitor,
        handle,
        storage=storage,
        disks=disks,
        settings=settings or MigrationSettings(),
        on_progress=on_progress,
    )


async def assert_continues(before: Guest, after: Guest) -> None:
    """The guest goes on where it was: the counter and uptime grow, no reboot."""
    last_count, last_up = before.console.ticks()[-1]
    count, up = await after.console.tick_after(last_count)
    assert count > last_count and up > last_up
    assert b"Linux version" not in after.console.data  # no boot messages: no reset
    count2, up2 = await after.console.tick_after(count)
    assert count2 > count and up2 > up


async def assert_source_untouched(source: Guest) -> None:
    """Running, no mirror jobs, no NBD nodes, migration settings as before."""
    monitor = source.monitor
    assert (await monitor.query_status()).status == "running"
    assert await monitor.query_block_jobs() == []
    drivers = {n["node-name"]: n["drv"] for n in await monitor.query_named_block_nodes()}
    assert "nbd" not in drivers.values(), drivers
    caps = await monitor.query_migrate_capabilities()
    assert not caps["pause-before-switchover"] and not caps["events"]
    last = source.console.ticks()[-1][0]
    await source.console.tick_after(last)


def assert_target_gone(target: Guest) -> None:
    assert target.process.exited.is_set()
    assert not target.spec.runtime.run_dir.exists()
    for disk in target.spec.disks:
        assert not disk.path.exists()


async def test_shared_storage_there_and_back(lab: Lab, tiny_image_dir: Path) -> None:
    source = await lab.boot(tiny_image_dir)
    await start_ticker(source)
    target = await lab.target(source.spec, "b")
    seen: list[MigrationProgress] = []

    stats = await (await migrate(source, target, lab, on_progress=seen.append)).run()

    assert stats.status == "completed"
    assert stats.downtime_ms is not None and 0 < stats.downtime_ms < stats.total_time_ms
    assert stats.pause_ms is not None and 0 < stats.pause_ms < 5000
    assert stats.transferred > 0 and stats.total >= MEMORY_MIB * 1024 * 1024
    assert seen[-1].phase == "completed"
    assert (await source.monitor.query_status()).status == "postmigrate"
    await assert_continues(source, target)
    assert MAC in await target.console.run("cat /sys/class/net/eth0/address")
    await source.quit()

    back = await lab.target(source.spec, "c")
    stats = await (await migrate(target, back, lab)).run()
    assert stats.status == "completed"
    await assert_continues(target, back)


async def test_local_storage_there_and_back(lab: Lab, tiny_image_dir: Path) -> None:
    source = await lab.boot(tiny_image_dir)
    assert await source.console.run("echo before-migration >/root/note; sync; echo ok") == "ok"
    await start_ticker(source)
    target = await lab.target(source.spec, "b", local=source.monitor)
    seen: list[MigrationProgress] = []

    stats = await (await migrate(source, target, lab, on_progress=seen.append)).run()

    assert stats.status == "completed" and stats.disks_s > 0
    handle = lab.targets[-1]
    assert handle.created_files == [] and not handle.created_run_dir  # the VM's now
    mirrored = [m for p in seen if p.phase == "disks" for m in p.mirrors]
    assert mirrored and mirrored[-1].disk == "disk0" and mirrored[-1].ready
    await assert_continues(source, target)
    assert await target.console.run("cat /root/note") == "before-migration"
    await target.console.run("echo after-migration >/root/note2; sync")
    # The source's NBD client nodes are gone; the target no longer serves NBD.
    assert "nbd" not in {n["drv"] for n in await source.monitor.query_named_block_nodes()}
    assert not target.spec.runtime.run_dir.joinpath("nbd.sock").exists()
    await source.quit()

    back = await lab.target(target.spec, "c", local=target.monitor)
    assert (await (await migrate(target, back, lab)).run()).status == "completed"
    await assert_continues(target, back)
    assert await back.console.run("cat /root/note /root/note2") == (
        "before-migration\nafter-migration"
    )
    await back.quit()
    check = subprocess.run(
        ["qemu-img", "check", str(back.spec.disks[0].path)], capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_shared_and_local_disks_together(lab: Lab, tiny_image_dir: Path) -> None:
    """disk0 in shared storage stays where it is (the target opens the same file);
    disk1, local, is mirrored: what a VM in a shared pool with node-local parts
    (a gen 2 VM's UEFI variables) goes through."""
    local = lab.root / "a-local.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(local), "16M"], check=True)
    source = await lab.boot(tiny_image_dir, local)
    marks = "echo shared-data >/root/note; echo local-data >/dev/sdb; sync; echo ok"
    assert await source.console.run(marks) == "ok"
    await start_ticker(source)
    shared, copy = source.spec.disks[0].path, lab.root / "b-local.qcow2"
    spec = target_spec(source.spec, lab.root / "b", [shared, copy])
    size = (await source.monitor.block_node_sizes())["disk1"]
    handle = await MigrationTarget.launch(
        spec, new_disks=[NewDisk(node="disk1", path=copy, format="qcow2", size=size)]
    )
    lab.targets.append(handle)
    target = Guest(spec, handle.process, handle.monitor,
                   await Console.open(spec.runtime.serial_socket))  # fmt: skip
    lab.guests.append(target)
    migration = LiveMigration(source.monitor, handle, storage=StorageMode.LOCAL, disks=["disk1"])

    stats = await migration.run()

    assert stats.status == "completed" and stats.disks_s > 0
    await assert_continues(source, target)
    assert await target.console.run("cat /root/note; head -c 10 /dev/sdb") == (
        "shared-data\nlocal-data"
    )
    files = {n["node-name"]: n["file"] for n in await target.monitor.query_named_block_nodes()}
    assert files["disk0"] == str(shared) and files["disk1"] == str(copy)
    await source.quit()


async def test_cancel_mid_way_rolls_back(lab: Lab, tiny_image_dir: Path) -> None:
    source = await lab.boot(tiny_image_dir)
    await start_ticker(source)
    target = await lab.target(source.spec, "b", local=source.monitor)
    slow = MigrationSettings(bandwidth=SLOW, progress_interval_s=0.2)
    migration = await migrate(source, target, lab, settings=slow)

    def cancel_in_ram_phase(progress: MigrationProgress) -> None:
        if progress.phase == "ram" and progress.transferred > 0:
            migration.cancel()

    migration.on_progress = cancel_in_ram_phase
    with pytest.raises(MigrationCancelled):
        await asyncio.wait_for(migration.run(), MIGRATION_DEADLINE)

    assert (await source.monitor.query_migrate())["status"] == "cancelled"
    assert_target_gone(target)
    await assert_source_untouched(source)

    # The source is clean: the next migration goes through.
    again = await lab.target(source.spec, "c")
    assert (await (await migrate(source, again, lab)).run()).status == "completed"
    await assert_continues(source, again)


async def test_target_killed_mid_way_leaves_source_running(lab: Lab, tiny_image_dir: Path) -> None:
    source = await lab.boot(tiny_image_dir)
    await start_ticker(source)
    target = await lab.target(source.spec, "b", local=source.monitor)
    slow = MigrationSettings(bandwidth=SLOW, progress_interval_s=0.2)
    migration = await migrate(source, target, lab, settings=slow)

    def kill_mid_mirror(progress: MigrationProgress) -> None:
        if any(m.copied > 0 for m in progress.mirrors):
            target.process.send_signal(signal.SIGKILL)

    migration.on_progress = kill_mid_mirror
    with pytest.raises(MigrationError, match="target QEMU died"):
        await asyncio.wait_for(migration.run(), MIGRATION_DEADLINE)

    assert_target_gone(target)
    await assert_source_untouched(source)
    check = subprocess.run(
        ["qemu-img", "check", "-U", str(source.spec.disks[0].path)],
        capture_output=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_multifd_and_postcopy(lab: Lab, tiny_image_dir: Path) -> None:
    source = await lab.boot(tiny_image_dir)
    await start_ticker(source)
    target = await lab.target(source.spec, "b")
    multifd = MigrationSettings(multifd_channels=2)
    stats = await (await migrate(source, target, lab, settings=multifd)).run()
    assert stats.status == "completed" and not stats.postcopy
    await assert_continues(source, target)
    await source.quit()

    # Post-copy as soon as the first pass is under way (slow enough to catch it active).
    back = await lab.target(source.spec, "c")
    postcopy = MigrationSettings(
        postcopy=True, postcopy_after_passes=1, bandwidth=SLOW, progress_interval_s=0.1
    )
    stats = await (await migrate(target, back, lab, settings=postcopy)).run()
    assert stats.status == "completed" and stats.postcopy
    await assert_continues(target, back)


def test_settings_refuse_what_qemu_cannot_do() -> None:
    with pytest.raises(ValueError, match="post-copy with multifd"):
        MigrationSettings(postcopy=True, multifd_channels=2)
    with pytest.raises(ValueError, match="downtime"):
        MigrationSettings(downtime_limit_ms=0)
    with pytest.raises(ValueError, match="bandwidth"):
        MigrationSettings(bandwidth=10)
    caps = MigrationSettings().capabilities(source=True, pause_before_switchover=True)
    assert caps == {
        "events": True,
        "multifd": False,
        "postcopy-ram": False,
        "auto-converge": True,
        "pause-before-switchover": True,
    }
    assert MigrationSettings().parameters(source=False) == {}


async def test_nbd_connection_cut_mid_mirror_rolls_back(lab: Lab, tiny_image_dir: Path) -> None:
    """The target cuts the disk copy's connection: the mirror fails, nothing is left."""
    source = await lab.boot(tiny_image_dir)
    await start_ticker(source)
    target = await lab.target(source.spec, "b", local=source.monitor)
    slow = MigrationSettings(bandwidth=SLOW, progress_interval_s=0.2)
    migration = await migrate(source, target, lab, settings=slow)
    cuts: list[asyncio.Task[None]] = []

    def cut_mid_mirror(progress: MigrationProgress) -> None:
        if not cuts and any(m.copied > 0 for m in progress.mirrors):
            cuts.append(asyncio.create_task(target.monitor.block_export_del("disk0", hard=True)))

    migration.on_progress = cut_mid_mirror
    with pytest.raises(MigrationError, match="disk mirror failed"):
        await asyncio.wait_for(migration.run(), MIGRATION_DEADLINE)

    await cuts[0]
    assert_target_gone(target)
    await assert_source_untouched(source)
