"""The receiving side of a live migration: a QEMU waiting for incoming state.

A `MigrationTarget` is a QEMU started from the VM's own argv plus
`incoming_argv()` (so it waits for ``migrate-incoming``), its QMP monitor, and
whatever was created for it (disk files, its runtime directory). Everything it
created is listed, so `abort` can leave the host exactly as it was: QEMU gone,
new disk files deleted, the runtime directory removed. Files it did not create
(shared-storage disks) are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmhive.hypervisor.qemu import process as qemu_process
from vmhive.hypervisor.qemu.argv import build_argv
from vmhive.hypervisor.qemu.migration.model import (
    Endpoint,
    MigrationError,
    MigrationSettings,
    incoming_argv,
)
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor
from vmhive.hypervisor.spec import VmSpec
from vmhive.storage import qemu_img

log = logging.getLogger(__name__)

CONNECT_DEADLINE = 15.0
QUIT_DEADLINE = 10.0
KILL_DEADLINE = 10.0


@dataclass(frozen=True)
class NewDisk:
    """A disk file the target creates empty, to be filled over NBD."""

    node: str  # the node name in both QEMUs ("disk0", "fw-vars")
    path: Path
    format: str
    size: int  # bytes, the source's virtual size


class MigrationTarget:
    """One target QEMU on this host, and what was created for it."""

    def __init__(
        self,
        spec: VmSpec,
        monitor: QmpMonitor,
        process: qemu_process.QemuProcess,
        *,
        created_files: Sequence[Path] = (),
        created_run_dir: bool = False,
    ) -> None:
        self.spec = spec
        self.monitor = monitor
        self.process = process
        self.created_files = list(created_files)
        self.created_run_dir = created_run_dir
        self._exports: list[str] = []
        self._nbd_running = False

    @property
    def run_dir(self) -> Path:
        return self.spec.runtime.run_dir

    @property
    def migration_endpoint(self) -> Endpoint:
        return Endpoint.unix(self.run_dir / "migrate.sock")

    @property
    def nbd_endpoint(self) -> Endpoint:
        return Endpoint.unix(self.run_dir / "nbd.sock")

    @classmethod
    async def launch(
        cls,
        spec: VmSpec,
        *,
        new_disks: Sequence[NewDisk] = (),
        qemu_binary: str = "qemu-system-x86_64",
    ) -> MigrationTarget:
        """Create `new_disks`, start QEMU from `spec` waiting for incoming state, and
        connect to its monitor. On failure nothing is left behind."""
        run_dir = spec.runtime.run_dir
        created_run_dir = not run_dir.exists()
        created: list[Path] = []
        proc: qemu_process.QemuProcess | None = None
        monitor = QmpMonitor(f"{spec.name}-target", command_timeout=30)
        try:
            for disk in new_disks:
                if disk.path.exists():
                    raise MigrationError(f"target disk {disk.path} already exists")
                created.append(disk.path)
                await qemu_img.create_blank(disk.path, disk.size, disk.format)
            argv = build_argv(spec, qemu_binary=qemu_binary) + incoming_argv()
            proc = qemu_process.launch(argv, run_dir, spec.runtime.log_file)
            await _connect(monitor, spec, proc)
        except BaseException as exc:
            await _teardown(monitor, proc, created, run_dir if created_run_dir else None)
            if isinstance(exc, (MigrationError, asyncio.CancelledError)):
                raise
            raise MigrationError(f"cannot start the target QEMU: {exc}") from exc
        return cls(spec, monitor, proc, created_files=created, created_run_dir=created_run_dir)

    async def listen(self, settings: MigrationSettings) -> None:
        """Set the capabilities both sides must share, then accept the migration."""
        await self.monitor.migrate_set_capabilities(
            settings.capabilities(source=False, pause_before_switchover=False)
        )
        params = settings.parameters(source=False)
        if params:
            await self.monitor.migrate_set_parameters(params)
        await self.monitor.migrate_incoming(self.migration_endpoint.uri())

    async def export_disks(self, nodes: Sequence[str]) -> None:
        """Serve `nodes` writable over NBD (export name = node name). Exporting an
        inactive image activates it; QEMU defers the devices' own locks until the
        migration completes."""
        await self.monitor.nbd_server_start(self.nbd_endpoint.legacy_socket_address())
        self._nbd_running = True
        for node in nodes:
            await self.monitor.block_export_add(node, node, writable=True)
            self._exports.append(node)

    async def stop_exports(self) -> None:
        """Remove the exports and stop the NBD server (after the switchover; a source
        whose NBD client has not hung up yet is cut off)."""
        while self._exports:
            await self.monitor.block_export_del(self._exports[-1], hard=True)
            self._exports.pop()
        if self._nbd_running:
            await self.monitor.nbd_server_stop()
            self._nbd_running = False

    async def abort(self) -> None:
        """Leave nothing: QEMU quit (or killed), created disks and directory removed
        (unless `commit` was called: then only QEMU is quit)."""
        await _teardown(
            self.monitor,
            self.process,
            self.created_files,
            self.run_dir if self.created_run_dir else None,
        )
        self.created_files = []

    def commit(self) -> None:
        """The guest runs here now: the disks and directory made for it belong to the
        VM from here on, and `abort` no longer deletes them."""
        self.created_files = []
        self.created_run_dir = False

    async def close(self) -> None:
        """After a successful migration: drop the monitor connection, keep QEMU."""
        await self.monitor.close()


async def _connect(monitor: QmpMonitor, spec: VmSpec, proc: qemu_process.QemuProcess) -> None:
    """QEMU binds its QMP socket before it listens: retry a refused connect while it lives."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_DEADLINE
    while True:
        if proc.exited.is_set():
            last = qemu_process.tail(spec.runtime.log_file).strip().splitlines()[-1:]
            raise MigrationError(f"{proc.exit_reason()}: {' '.join(last)}")
        try:
            await monitor.connect(spec.runtime.qmp_socket, timeout=5)
            return
        except MonitorError:
            if loop.time() > deadline:
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.exited.wait(), 0.05)


async def _teardown(
    monitor: QmpMonitor,
    proc: qemu_process.QemuProcess | None,
    files: Sequence[Path],
    run_dir: Path | None,
) -> None:
    if proc is not None and not proc.exited.is_set():
        if monitor.connected:
            with contextlib.suppress(MonitorError):
                await monitor.quit()
        if not await proc.wait(QUIT_DEADLINE):
            log.warning("target QEMU %d did not quit; killing it", proc.pid)
            proc.send_signal(signal.SIGKILL)
            if not await proc.wait(KILL_DEADLINE):
                raise MigrationError(f"target QEMU {proc.pid} survived SIGKILL")
    await monitor.close()
    for path in files:
        path.unlink(missing_ok=True)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
