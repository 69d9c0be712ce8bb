"""Live migration between two QEMU processes, driven over QMP.

`LiveMigration.run` moves a running (or paused) guest from the source QEMU to
a `MigrationTarget`. See docs/migration.md for the command sequence; in short:

* shared storage: capabilities and parameters on both sides,
  ``migrate-incoming`` on the target, ``migrate`` on the source, progress by
  ``query-migrate`` until ``completed``;
* local storage: first the target exports its new, empty disks over NBD, the
  source opens them (``blockdev-add`` driver nbd) and mirrors every writable
  disk into them (``blockdev-mirror sync=full``). Once all mirrors are READY,
  RAM migration starts with ``pause-before-switchover``: at ``pre-switchover``
  (vCPUs stopped, images still active) each mirror is ended by
  ``block-job-cancel`` -- for a READY mirror that waits for the last writes
  and leaves the target an exact copy -- then ``migrate-continue``.

Any failure or `cancel()` before the switchover rolls back (`_rollback`): the
migration is cancelled, the target torn down (QEMU gone, its new disks
deleted), the source's mirror jobs and NBD nodes removed, its migration
settings restored, and the guest running on the source as before. After a
switch to post-copy there is no way back: the guest's memory is split between
the two QEMUs, and a failure then is reported as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmhive.hypervisor.qemu.migration.model import (
    FINAL_STATUSES,
    MigrationCancelled,
    MigrationError,
    MigrationProgress,
    MigrationSettings,
    MigrationStats,
    MirrorProgress,
    StorageMode,
    progress_from_query,
    should_start_postcopy,
    stats_from_query,
)
from vmhive.hypervisor.qemu.migration.target import MigrationTarget, NewDisk
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpCommandError, QmpEvent, QmpMonitor
from vmhive.hypervisor.spec import VmSpec

log = logging.getLogger(__name__)

ProgressCallback = Callable[[MigrationProgress], None]

ROLLBACK_DEADLINE = 60.0
_BLOCK_JOB_END = frozenset({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"})


class EventFeed(Protocol):
    """Where the engine reads the source's QMP events: the monitor itself, or a copy
    of them from whoever else pumps that monitor (there is one reader per monitor)."""

    async def next_event(self, timeout: float | None = None) -> QmpEvent: ...


@dataclass
class _Mirror:
    node: str
    nbd_node: str
    job: str
    started: bool = False
    ready: bool = False
    ended: bool = False
    error: str | None = None


async def plan_local_disks(
    source: QmpMonitor, source_spec: VmSpec, target_spec: VmSpec
) -> list[NewDisk]:
    """The disks a local-storage target must create: every writable disk (and the
    UEFI variables) whose path differs, at the source's virtual size as the source
    QEMU reports it (so nothing on the source host is read directly)."""
    wanted: list[tuple[str, str, Path]] = []
    for i, (src, dst) in enumerate(zip(source_spec.disks, target_spec.disks, strict=True)):
        if src.read_only:
            if src.path != dst.path:
                raise ValueError(f"read-only disk{i} is not copied: it must keep its path")
            continue
        if src.path == dst.path:
            raise ValueError(f"disk{i} has the same path on both sides: that is shared storage")
        wanted.append((f"disk{i}", dst.format, dst.path))
    src_fw, dst_fw = source_spec.firmware, target_spec.firmware
    if src_fw and dst_fw and src_fw.vars != dst_fw.vars:
        wanted.append(("fw-vars", "raw", dst_fw.vars))
    sizes = await source.block_node_sizes()
    disks = []
    for node, fmt, path in wanted:
        if not sizes.get(node):
            raise MigrationError(f"the source QEMU has no block node {node}")
        disks.append(NewDisk(node=node, path=path, format=fmt, size=sizes[node]))
    return disks


class LiveMigration:
    """One migration from `source` (a running QEMU's monitor) to `target`."""

    def __init__(
        self,
        source: QmpMonitor,
        target: MigrationTarget,
        *,
        storage: StorageMode,
        disks: Sequence[str] = (),
        settings: MigrationSettings | None = None,
        on_progress: ProgressCallback | None = None,
        source_events: EventFeed | None = None,
    ) -> None:
        """`disks` are the source node names to mirror (local storage only; see
        `plan_local_disks`)."""
        if storage is StorageMode.LOCAL and not disks:
            raise ValueError("local storage migration needs the disks to mirror")
        if storage is StorageMode.SHARED and disks:
            raise ValueError("shared storage migration mirrors no disks")
        self.source = source
        self.target = target
        self.storage = storage
        self.settings = settings or MigrationSettings()
        self.on_progress = on_progress
        self._events: EventFeed = source_events or source
        self._mirrors = [_Mirror(n, f"migrate-nbd-{n}", f"migrate-{n}") for n in disks]
        self._nbd_nodes: list[str] = []
        self._changed = asyncio.Event()
        self._cancel_requested = False
        self._status = "none"  # the source's migration status, from MIGRATION events
        self._phase = "setup"
        self._started = 0.0
        self._migrate_started = False
        self._switched_over = False  # migrate-continue sent
        self._handed_over = False  # 'cont' sent to the target, its outcome unknown
        self._stopped_at: float | None = None  # the source's STOP event (QEMU's clock)
        self._resumed_at: float | None = None  # the target's RESUME event
        self._postcopy = False
        self._saved_caps: dict[str, bool] = {}
        self._saved_params: dict[str, object] = {}
        self._was_running = False
        self.last_progress: MigrationProgress | None = None

    def cancel(self) -> None:
        """Ask for a rollback; `run` raises `MigrationCancelled` once it is done.
        Too late once the target runs the guest (then `run` completes)."""
        self._cancel_requested = True
        self._changed.set()

    async def run(self) -> MigrationStats:
        self._started = time.monotonic()
        pump = asyncio.create_task(self._pump_events(), name="migration-events")
        exit_watch = asyncio.create_task(self._watch_target(), name="migration-target-exit")
        try:
            try:
                async with asyncio.timeout(self.settings.deadline_s):
                    disks_s = await self._copy_disks()
                    await self._migrate_ram()
                    await self._await_target()
            except TimeoutError:
                error: BaseException = MigrationError(
                    f"migration did not finish within {self.settings.deadline_s:g}s"
                )
            except BaseException as exc:
                error = exc
            else:
                return await self._finish(disks_s)
            if self._postcopy:
                raise MigrationError(
                    f"post-copy migration failed, the guest is lost: {error}"
                ) from error
            if self._handed_over:
                raise MigrationError(
                    "the target may be running the guest (interrupted at 'cont'); "
                    f"the source stays paused: {error}"
                ) from error
            await self._rollback()
            if isinstance(error, asyncio.CancelledError | MigrationError):
                raise error
            raise MigrationError(f"migration failed: {error}") from error
        finally:
            for task in (pump, exit_watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- phases ---------------------------------------------------------------

    async def _copy_disks(self) -> float:
        status = await self.source.query_status()
        if status.status not in ("running", "paused"):
            raise MigrationError(f"the source VM is {status.status}, not running or paused")
        self._was_running = status.running
        self._saved_caps = await self.source.query_migrate_capabilities()
        params = await self.source.query_migrate_parameters()
        self._saved_params = {
            k: params[k]
            for k in ("downtime-limit", "max-bandwidth", "multifd-channels")
            if k in params
        }
        await self.target.listen(self.settings)
        if not self._mirrors:
            return 0.0
        self._phase = "disks"
        started = time.monotonic()
        await self.target.export_disks([m.node for m in self._mirrors])
        endpoint = self.target.nbd_endpoint.socket_address()
        for mirror in self._mirrors:
            await self.source.blockdev_add(
                {
                    "driver": "nbd",
                    "node-name": mirror.nbd_node,
                    "server": endpoint,
                    "export": mirror.node,
                }
            )
            self._nbd_nodes.append(mirror.nbd_node)
            mirror.started = True
            await self.source.blockdev_mirror(
                mirror.job, mirror.node, mirror.nbd_node, speed=self.settings.bandwidth
            )
        await self._wait(lambda: all(m.ready for m in self._mirrors), "the disk mirrors")
        await self._poll()  # report the disks in sync
        return time.monotonic() - started

    async def _migrate_ram(self) -> None:
        self._phase = "ram"
        pause = bool(self._mirrors)
        await self.source.migrate_set_capabilities(
            self.settings.capabilities(source=True, pause_before_switchover=pause)
        )
        await self.source.migrate_set_parameters(self.settings.parameters(source=True))
        ram_started = time.monotonic()
        self._status = "setup"
        self._migrate_started = True
        await self.source.migrate(self.target.migration_endpoint.uri())
        while True:
            await self._wait(
                lambda: self._status in FINAL_STATUSES or self._at_pre_switchover(),
                "the RAM migration",
                on_tick=lambda p: self._maybe_postcopy(p, ram_started),
            )
            if self._at_pre_switchover():
                await self._switch_disks_over()
                continue
            if self._status != "completed":
                reply = await self.source.query_migrate()
                raise MigrationError(
                    f"migration {self._status}: {reply.get('error-desc', 'no reason given')}"
                )
            return

    def _at_pre_switchover(self) -> bool:
        return self._status == "pre-switchover" and not self._switched_over

    async def _maybe_postcopy(self, progress: MigrationProgress, ram_started: float) -> None:
        if self._postcopy or progress.status != "active":
            return
        if should_start_postcopy(self.settings, progress.passes, time.monotonic() - ram_started):
            log.info("migration: not converged after %d passes; post-copy", progress.passes)
            await self.source.migrate_start_postcopy()
            self._postcopy = True

    async def _switch_disks_over(self) -> None:
        """vCPUs are stopped: end the mirrors (a READY mirror's cancel waits for its
        last writes), then let QEMU send the device state."""
        self._phase = "switchover"
        deadline = self.settings.switchover_deadline_s
        await asyncio.gather(*(self.source.block_job_cancel(m.job) for m in self._mirrors))
        await self._wait(
            lambda: all(m.ended for m in self._mirrors), "the last disk writes", deadline
        )
        failed = [f"{m.node}: {m.error}" for m in self._mirrors if m.error]
        if failed:
            raise MigrationError(f"disk mirror failed: {'; '.join(failed)}")
        self._switched_over = True
        await self.source.migrate_continue("pre-switchover")

    async def _await_target(self) -> None:
        """The source sent everything: wait until the target has loaded it, then let it
        run the guest. Until `cont` is sent, a failure still rolls back."""
        target = self.target.monitor
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.switchover_deadline_s
        while (status := (await target.query_migrate()).get("status")) not in FINAL_STATUSES:
            if loop.time() > deadline:
                raise MigrationError("the target did not finish loading the guest")
            with contextlib.suppress(MonitorError):
                await target.wait_event("MIGRATION", timeout=deadline - loop.time())
        if status != "completed":
            raise MigrationError(f"the target could not load the guest (migration {status})")
        if not self._was_running:
            return  # the guest stays paused, as it was on the source
        # From here on the target may run the guest: whatever interrupts `cont`
        # (no reply, a deadline, a cancel) leaves the source paused.
        self._handed_over = True
        try:
            await target.cont()  # a no-op if the target was started without -S
        except QmpCommandError:
            self._handed_over = False  # refused: the target does not run the guest
            raise

    async def _finish(self, disks_s: float) -> MigrationStats:
        """The target runs the guest: remove the NBD plumbing and report."""
        self._phase = "completed"
        self.target.commit()
        if self._was_running:
            with contextlib.suppress(MonitorError):  # (without -S: at the load's end)
                resumed = await self.target.monitor.wait_event("RESUME", timeout=10)
                self._resumed_at = resumed.timestamp
        try:
            for node in self._nbd_nodes:
                await self.source.blockdev_del(node)
            self._nbd_nodes = []
            await self.target.stop_exports()
        except MonitorError as exc:
            log.warning("migration: cleanup after the switchover failed: %s", exc)
        reply = await self.source.query_migrate()
        pause_ms = None
        if self._stopped_at is not None and self._resumed_at is not None:
            pause_ms = (self._resumed_at - self._stopped_at) * 1000
        stats = stats_from_query(
            reply,
            postcopy=self._postcopy,
            pause_ms=pause_ms,
            disks_s=disks_s,
            wall_s=time.monotonic() - self._started,
        )
        self._report(
            progress_from_query(reply, phase="completed", elapsed_s=stats.wall_s, mirrors=())
        )
        return stats

    # -- rollback -------------------------------------------------------------

    async def _rollback(self) -> None:
        """Undo everything, in an order that never lets the guest run twice: the
        target is gone before the source is resumed."""
        self._phase = "rollback"
        errors: list[str] = []

        async def step(what: str, action: Awaitable[Any]) -> None:
            try:
                await action
            except Exception as exc:
                log.warning("migration rollback: %s failed: %s", what, exc)
                errors.append(f"{what}: {exc}")

        async with asyncio.timeout(ROLLBACK_DEADLINE):
            if self._migrate_started:
                await step("cancel the migration", self._cancel_source_migration())
            await step("tear down the target", self.target.abort())
            if self._mirrors:
                await step("cancel the disk mirrors", self._cancel_mirrors())
            for node in reversed(self._nbd_nodes):
                await step(f"remove {node}", self.source.blockdev_del(node))
            self._nbd_nodes = []
            await step("restore migration settings", self._restore_settings())
            await step("resume the source", self._resume_source())
        if errors:
            raise MigrationError("rollback incomplete: " + "; ".join(errors))

    async def _cancel_source_migration(self) -> None:
        reply = await self.source.query_migrate()
        if reply.get("status") not in FINAL_STATUSES:
            await self.source.migrate_cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await self.source.query_migrate()).get("status") not in FINAL_STATUSES:
            if loop.time() > deadline:
                raise MigrationError("the source's migration did not stop")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)

    async def _cancel_mirrors(self) -> None:
        if self._nbd_nodes:  # the target is gone by now; on a cut network the mirrors'
            # NBD requests would wait for it forever, and no cancel ends such a job
            with contextlib.suppress(MonitorError):
                await self.source.yank_block_nodes(self._nbd_nodes)
        ours = {m.job for m in self._mirrors}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        cancelled: set[str] = set()
        while running := {j["device"] for j in await self.source.query_block_jobs()} & ours:
            for job in running - cancelled:
                with contextlib.suppress(MonitorError):
                    await self.source.block_job_cancel(job, force=True)
                cancelled.add(job)
            if loop.time() > deadline:
                raise MigrationError(f"mirror jobs did not end: {sorted(running)}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)

    async def _restore_settings(self) -> None:
        changed = {
            cap: self._saved_caps.get(cap, False)
            for cap in self.settings.capabilities(source=True, pause_before_switchover=True)
            if cap in self._saved_caps
        }
        if changed:
            await self.source.migrate_set_capabilities(changed)
        if self._saved_params:
            await self.source.migrate_set_parameters(self._saved_params)

    async def _resume_source(self) -> None:
        status = await self.source.query_status()
        if self._was_running and not status.running:
            # QEMU resumes a guest itself after a cancelled or failed migration,
            # except once it completed (postmigrate): `cont` re-activates the images.
            await self.source.cont()

    # -- waiting and progress ---------------------------------------------------

    async def _wait(
        self,
        done: Callable[[], bool],
        what: str,
        timeout: float | None = None,
        on_tick: Callable[[MigrationProgress], Awaitable[None]] | None = None,
    ) -> None:
        """Wait for `done()`, woken by events, reporting progress every interval (not
        at once: no query may delay the switchover while the vCPUs are stopped)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        next_tick = loop.time() + self.settings.progress_interval_s
        while True:
            if self._cancel_requested:
                raise MigrationCancelled("migration cancelled")
            if self.target.process.exited.is_set():
                raise MigrationError(f"target QEMU died: {self.target.process.exit_reason()}")
            errors = [f"{m.node}: {m.error}" for m in self._mirrors if m.error]
            if errors:
                raise MigrationError(f"disk mirror failed: {'; '.join(errors)}")
            if done():
                return
            now = loop.time()
            if deadline is not None and now > deadline:
                raise MigrationError(f"timed out waiting for {what}")
            if now >= next_tick:
                progress = await self._poll()
                if on_tick is not None:
                    await on_tick(progress)
                next_tick = now + self.settings.progress_interval_s
                continue
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), next_tick - now)

    async def _poll(self) -> MigrationProgress:
        reply = await self.source.query_migrate()
        status = str(reply.get("status", "none"))
        # In case an event was missed: only what cannot be stale right after
        # migrate-continue (QEMU leaves pre-switchover asynchronously).
        if self._migrate_started and (status in FINAL_STATUSES or status == "pre-switchover"):
            self._status = status
        mirrors: list[MirrorProgress] = []
        if self._mirrors and self._phase == "disks":
            jobs = {j["device"]: j for j in await self.source.query_block_jobs()}
            for m in self._mirrors:
                job = jobs.get(m.job, {})
                mirrors.append(
                    MirrorProgress(
                        disk=m.node,
                        copied=int(job.get("offset", 0)),
                        total=int(job.get("len", 0)),
                        ready=m.ready,
                    )
                )
        progress = progress_from_query(
            reply,
            phase=self._phase,
            elapsed_s=time.monotonic() - self._started,
            mirrors=mirrors,
        )
        self._report(progress)
        return progress

    def _report(self, progress: MigrationProgress) -> None:
        self.last_progress = progress
        if self.on_progress is not None:
            try:
                self.on_progress(progress)
            except Exception:
                log.exception("migration progress callback failed")

    async def _pump_events(self) -> None:
        """Events from before this migration's own commands (an earlier migration's,
        still queued) are skipped: they are read while the set-up commands run."""
        jobs = {m.job: m for m in self._mirrors}
        while True:
            try:
                event = await self._events.next_event()
            except MonitorError:
                self._changed.set()
                return
            if event.name == "MIGRATION" and self._migrate_started:
                self._status = str(event.data.get("status", self._status))
            elif event.name == "STOP" and self._migrate_started:
                self._stopped_at = event.timestamp
            elif event.name.startswith("BLOCK_JOB_"):
                mirror = jobs.get(str(event.data.get("device", "")))
                if mirror is None or not mirror.started:
                    continue
                if event.name == "BLOCK_JOB_READY":
                    mirror.ready = True
                elif event.name == "BLOCK_JOB_ERROR":
                    mirror.error = f"I/O error ({event.data.get('operation', 'write')})"
                elif event.name in _BLOCK_JOB_END:
                    mirror.ended = True
                    if "error" in event.data:
                        mirror.error = str(event.data["error"])
                    elif event.name == "BLOCK_JOB_CANCELLED" and self._phase == "switchover":
                        mirror.error = "cancelled before it was in sync"
            self._changed.set()

    async def _watch_target(self) -> None:
        await self.target.process.exited.wait()
        self._changed.set()
