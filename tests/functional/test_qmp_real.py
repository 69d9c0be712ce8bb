"""The QMP facade against a real QEMU (``-machine none``, TCG, no guest image)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmhive.hypervisor.qemu.qmp import QmpCommandError, QmpMonitor, RunStatus

pytestmark = pytest.mark.functional

QEMU = shutil.which("qemu-system-x86_64")


@dataclass
class RunningQemu:
    proc: asyncio.subprocess.Process
    qmp_path: Path


async def _wait_for_socket(qemu: RunningQemu, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not qemu.qmp_path.exists():
        if qemu.proc.returncode is not None:
            stderr = await qemu.proc.stderr.read() if qemu.proc.stderr else b""
            pytest.fail(f"QEMU exited early ({qemu.proc.returncode}): {stderr.decode()}")
        if loop.time() > end:
            pytest.fail(f"QEMU did not create {qemu.qmp_path} within {deadline}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def qemu() -> AsyncIterator[RunningQemu]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with tempfile.TemporaryDirectory(prefix="vmhq-") as tmp:
        qmp_path = Path(tmp) / "qmp.sock"
        proc = await asyncio.create_subprocess_exec(
            QEMU,
            "-machine",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        running = RunningQemu(proc, qmp_path)
        try:
            await _wait_for_socket(running, deadline=10)
            yield running
        finally:
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=10)


async def test_real_qemu_lifecycle(qemu: RunningQemu) -> None:
    monitor = QmpMonitor("real", command_timeout=10)
    try:
        await monitor.connect(qemu.qmp_path, timeout=10)
        assert monitor.connected

        assert await monitor.query_status() == RunStatus(status="running", running=True)
        version = await monitor.query_version()
        assert version.split(".")[0].isdigit() and version.count(".") == 2

        enabled, _present = await monitor.query_kvm()
        assert enabled is False  # -accel tcg
        assert await monitor.query_cpus_fast() == []  # -machine none has no CPUs

        await monitor.stop()
        assert (await monitor.wait_event("STOP", timeout=10)).name == "STOP"
        assert await monitor.query_status() == RunStatus(status="paused", running=False)
        await monitor.cont()
        assert (await monitor.wait_event("RESUME", timeout=10)).name == "RESUME"
        assert (await monitor.query_status()).running

        assert version in await monitor.human_monitor_command("info version")

        # A real QEMU error reply (via the private executor: no public method fails here).
        with pytest.raises(QmpCommandError) as info:
            await monitor._execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert monitor.connected

        await monitor.quit()
        shutdown = await monitor.wait_event("SHUTDOWN", timeout=10)
        assert shutdown.data.get("reason") == "host-qmp-quit"
        assert shutdown.timestamp > 1_600_000_000
        await asyncio.wait_for(monitor.disconnected.wait(), timeout=10)
        assert not monitor.connected
        assert await asyncio.wait_for(qemu.proc.wait(), timeout=10) == 0
    finally:
        await monitor.close()
