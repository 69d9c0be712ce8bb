"""`vmhive serve`: one asyncio process with the API, the agent and the job runner."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from vmhive.agent.reconciler import Agent
from vmhive.api.app import create_app, wrap
from vmhive.api.routes_uploads import sweep_uploads
from vmhive.config import Settings
from vmhive.guest import tiny
from vmhive.hypervisor.base import Driver
from vmhive.hypervisor.qemu.accel import choose_accel
from vmhive.hypervisor.qemu.driver import QemuDriver
from vmhive.jobs.runner import JobRunner
from vmhive.metrics.service import MetricsService
from vmhive.services.cloudinit import CloudInitService
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict
from vmhive.services.host import HostInfo, pinned_machines, qemu_version
from vmhive.services.images import ImageService
from vmhive.services.lifecycle import Lifecycle
from vmhive.services.media import MediaService
from vmhive.services.migration_target import IncomingMigrations
from vmhive.services.migrations import MigrationService
from vmhive.services.networks import NetworkService
from vmhive.services.nodes import NodeService
from vmhive.services.pools import PoolService
from vmhive.services.snapshot_schedules import ScheduleService
from vmhive.services.snapshots import SnapshotService
from vmhive.services.templates import TemplateService
from vmhive.services.users import UserService
from vmhive.services.vms import CreateVmRequest, DiskRequest, VmService
from vmhive.services.volumes import VolumeService
from vmhive.store import db
from vmhive.store.models import Setting, Vm

log = logging.getLogger("vmhive")

DEMO_SETTING = "demo.created"


def ensure_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Daemon:
    def __init__(self, settings: Settings, driver: Driver | None = None) -> None:
        self.settings = settings
        self.driver: Driver = driver or QemuDriver(
            serial_log_max_bytes=settings.serial_log_max_bytes
        )

    async def start(self) -> None:
        settings = self.settings
        settings.check()
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (settings.vms_dir, settings.run_root, settings.images):
            directory.mkdir(parents=True, exist_ok=True)
        self.token = ensure_token(settings.token_file)
        await asyncio.to_thread(db.migrate, settings.database_url)
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.make_sessionmaker(self.engine)
        self.runner = JobRunner(self.sessions)
        self.users = UserService(self.sessions)
        password = await self.users.ensure_admin()
        if password is not None:
            print(
                f"vmhive: web UI login: admin / {password} "
                "(shown only now; change it with: vmhive user passwd admin)",
                flush=True,
            )
        await asyncio.to_thread(sweep_uploads, settings.data_dir)
        # The probe boots the tiny image's kernel: from the image store, or on
        # the very first start from the prebuilt seed it will be copied from.
        tiny_dir = settings.images
        seed = os.environ.get("VMHIVE_IMAGE_SEED")
        if not (tiny_dir / tiny.KERNEL_NAME).exists() and seed:
            tiny_dir = Path(seed)
        verdict = await asyncio.to_thread(
            choose_accel,
            settings.accel,
            settings.data_dir / "accel.json",
            tiny_dir / tiny.KERNEL_NAME,
            tiny_dir / tiny.INITRD_NAME,
        )
        self.host = HostInfo(
            qemu_version=await qemu_version(),
            machines=await pinned_machines(self.sessions),
            accel=verdict,
        )
        self.ctx = ServiceContext(settings, self.sessions, self.driver, self.runner, self.host)
        self.nodes = NodeService(self.ctx)
        try:
            await self.nodes.register()
        except Conflict as exc:
            raise SystemExit(f"vmhive: {exc}") from None
        self.networks = NetworkService(self.ctx)
        self.pools = PoolService(self.ctx)
        self.lifecycle = Lifecycle(self.ctx, self.networks)
        self.vms = VmService(self.ctx, self.lifecycle, self.networks, self.nodes, self.pools)
        self.incoming = IncomingMigrations(self.ctx, self.networks, self.nodes, self.pools)
        self.migrations = MigrationService(
            self.ctx, self.networks, self.nodes, self.incoming, self.pools
        )
        self.volumes = VolumeService(self.ctx, self.pools)
        self.media = MediaService(self.ctx)
        self.images = ImageService(self.ctx)
        self.cloudinit = CloudInitService(self.ctx)
        self.templates = TemplateService(self.ctx, self.lifecycle)
        self.snapshots = SnapshotService(self.ctx, self.lifecycle)
        self.schedules = ScheduleService(self.ctx, self.snapshots)
        await self.nodes.heartbeat(pools=await self.pools.refresh())
        await self.networks.restore()
        if settings.default_network:
            await self.networks.ensure_default()
        self.agent = Agent(
            self.ctx,
            self.vms,
            self.lifecycle,
            self.volumes,
            self.images,
            self.networks,
            self.migrations,
        )
        await self.agent.recover()
        await self.snapshots.recover()
        await self.networks.sync_ports()
        await self.agent.autostart()
        self.agent.start_loop()
        self.metrics = MetricsService(settings, self.sessions, self.driver)
        await self.metrics.start()
        self.schedules.start()
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
        log.info("accelerator: %s (%s)", verdict.accel, verdict.reason)

    async def stop(self) -> None:
        """Let go of everything; running guests are not touched."""
        self._heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeat
        await self.metrics.stop()  # and saves the history
        await self.agent.stop_loop()
        await self.schedules.stop()
        await self.runner.shutdown()
        await self.driver.detach_all()
        await self.engine.dispose()

    async def _beat(self) -> None:
        """This node is alive: its heartbeat, every reconcile interval."""
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            try:
                await self.nodes.heartbeat(pools=await self.pools.refresh())
                await self.networks.take_down_deleted()
            except Exception:
                log.exception("heartbeat failed")

    async def vm_counts(self, session: AsyncSession) -> dict[str, int]:
        rows = await session.execute(select(Vm.state, func.count()).group_by(Vm.state))
        return {state: count for state, count in rows.tuples()}

    # -- first start ------------------------------------------------------------

    async def create_demo(self) -> None:
        """On the very first start, create and start a VM named demo."""
        async with self.sessions() as session:
            # Once per database: of hosts sharing one, only the first makes it.
            made = await db.insert_if_absent(session, Setting, key=DEMO_SETTING, value="1")
            await session.commit()
        if not made:
            return
        if await self.images.get("tiny") is None:
            log.info("building the tiny guest image for the demo VM (first start only)")
            job_id = await self.images.build("tiny")
            await self.runner.wait(job_id, 1800)
        try:
            job_id = await self.vms.create(
                CreateVmRequest(
                    name="demo",
                    generation=2,
                    vcpus=1,
                    memory_mib=256,
                    disks=[DiskRequest(image="tiny")],
                    description="created on first start from the tiny test image",
                    start=True,
                )
            )
        except Conflict:
            return
        await self.runner.wait(job_id, 600)
        job = await self.runner.get(job_id)
        if job.state == "succeeded":
            print(
                "vmhive: the demo VM is running. Try:  vmhive vm list   vmhive vm console demo",
                flush=True,
            )
        else:
            print(f"vmhive: creating the demo VM failed: {job.error}", flush=True)


def _unix_listener(path: Path) -> socket.socket:
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale, from a daemon that died
        else:
            raise SystemExit(f"vmhive: another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"vmhive: cannot listen on {host}:{port}: {exc}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn, with SIGINT/SIGTERM handled on the loop.

    uvicorn's own handling re-raises the signal once serving stops, which
    would end the process before the daemon has let go of its VMs and jobs.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def freeze_long_lived() -> None:
    """What a started daemon holds lives as long as its process (modules, mappers,
    services): keep it out of the collector's full passes, which would otherwise
    walk it all again whenever a large request (a list of 10,000 VMs) allocates
    much. Once per process: frozen objects are never collected."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> None:
    daemon = Daemon(settings)
    await daemon.start()
    host, port = settings.listen_host_port()
    sockets = [_tcp_listener(host, port), _unix_listener(settings.api_socket)]
    app = wrap(create_app(daemon), daemon)
    freeze_long_lived()
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="websockets-sansio")
    server = _Server(config)
    print(f"vmhive: serving on http://{host}:{port} and {settings.api_socket}", flush=True)
    demo: asyncio.Task[None] | None = None
    if settings.create_demo:
        demo = asyncio.create_task(daemon.create_demo())
    try:
        await server.serve(sockets=sockets)
    finally:
        if demo is not None:
            demo.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await demo
        await daemon.stop()
        settings.api_socket.unlink(missing_ok=True)
        print("vmhive: stopped; running VMs keep running", flush=True)
