"""MetricsService: samples every `metrics_interval` seconds into round-robin stores,
answers the API's range queries and /metrics, and keeps the history across
daemon restarts in <data-dir>/metrics/ (one file per VM plus host.rrd).

Files are written every few minutes and at stop, only for stores that changed;
a VM's store and file go when the VM no longer exists. History does not cover
the time the daemon was down: those buckets read as gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from vmhive.config import Settings
from vmhive.hypervisor.base import Driver
from vmhive.metrics import prometheus
from vmhive.metrics.rates import HOST_FIELDS, VM_FIELDS
from vmhive.metrics.rrd import RANGES, RoundRobin, archives_for
from vmhive.metrics.sampler import Sampler, Tick

log = logging.getLogger(__name__)

RANGE_NAMES = tuple(spec.name for spec in RANGES)
PERSIST_INTERVAL = 300.0
HOST_FILE = "host.rrd"
_UUID_FILE = re.compile(r"^[0-9a-f-]{36}\.rrd$")


class UnknownRange(ValueError):
    def __init__(self, given: str) -> None:
        super().__init__(f"range must be one of {', '.join(RANGE_NAMES)}, got {given!r}")


class MetricsService:
    def __init__(self, settings: Settings, sessions: Any, driver: Driver) -> None:
        self.interval = settings.metrics_interval
        self.archives = archives_for(self.interval)
        self.directory = settings.data_dir / "metrics"
        self.sampler = Sampler(sessions, driver, (settings.data_dir, settings.images))
        self.host = RoundRobin(HOST_FIELDS, self.archives)
        self.vms: dict[str, RoundRobin] = {}
        self._empty_vm = RoundRobin(VM_FIELDS, self.archives)
        self._dirty: set[str] = set()  # "host" or VM uuids changed since the last write
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load the saved history, take a first sample (so the host's `current` is
        there at once) and start the loop. Metrics never keep the daemon from starting."""
        await asyncio.to_thread(self._load)
        try:
            await self.tick()
        except Exception:
            log.exception("metrics sampling failed")
        self._task = asyncio.create_task(self._run(), name="metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.persist()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.interval
        last_write = loop.time()
        while True:
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            try:
                await self.tick()
                if loop.time() - last_write >= PERSIST_INTERVAL:
                    last_write = loop.time()
                    await self.persist()
            except Exception:
                log.exception("metrics sampling failed")
            next_tick += self.interval
            behind = loop.time() - next_tick
            if behind > 0:  # a tick overran: skip the missed ones, keep the phase
                next_tick += (behind // self.interval + 1) * self.interval

    async def tick(self, now: float | None = None) -> Tick:
        tick = await self.sampler.tick(now)
        self.record(tick)
        return tick

    def record(self, tick: Tick) -> None:
        self.host.update(tick.at, tick.host)
        self._dirty.add("host")
        for uuid, row in tick.vms.items():
            store = self.vms.get(uuid)
            if store is None:
                store = self.vms[uuid] = RoundRobin(VM_FIELDS, self.archives)
            store.update(tick.at, row)
            self._dirty.add(uuid)
        for uuid in set(self.vms) - tick.known:
            self.drop(uuid)

    def drop(self, vm_uuid: str) -> None:
        """Forget a deleted VM's history, in memory and on disk."""
        self.vms.pop(vm_uuid, None)
        self._dirty.discard(vm_uuid)
        with contextlib.suppress(OSError):
            (self.directory / f"{vm_uuid}.rrd").unlink()

    # -- persistence ----------------------------------------------------------

    async def persist(self) -> None:
        """Write the stores that changed (their bytes are taken here, written in a thread)."""
        blobs: dict[str, bytes] = {}
        for key in self._dirty:
            store = self.host if key == "host" else self.vms.get(key)
            if store is not None:
                blobs[HOST_FILE if key == "host" else f"{key}.rrd"] = store.dump()
        self._dirty.clear()
        if blobs:
            await asyncio.to_thread(self._write, blobs)

    def _write(self, blobs: dict[str, bytes]) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        for name, data in blobs.items():
            tmp = self.directory / f".{name}.tmp"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, self.directory / name)
            except OSError as exc:
                log.warning("cannot save metrics %s: %s", name, exc)
                tmp.unlink(missing_ok=True)

    def _load(self) -> None:
        try:
            paths = list(self.directory.iterdir())
        except OSError:  # no history yet (or unreadable: it starts afresh)
            return
        for path in paths:
            if path.name == HOST_FILE:
                host = self._read(path, HOST_FIELDS)
                if host is not None:
                    self.host = host
            elif _UUID_FILE.match(path.name):
                store = self._read(path, VM_FIELDS)
                if store is not None:
                    self.vms[path.name.removesuffix(".rrd")] = store
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    def _read(self, path: Path, fields: tuple[str, ...]) -> RoundRobin | None:
        try:
            store = RoundRobin.load(path.read_bytes(), fields, self.archives)
        except OSError as exc:
            log.warning("cannot read metrics %s: %s", path, exc)
            return None
        if store is None:
            log.info("metrics %s: other layout or damaged; history starts afresh", path.name)
        return store

    # -- queries --------------------------------------------------------------

    def vm_series(self, vm_uuid: str, range_name: str, now: float | None = None) -> dict[str, Any]:
        store = self.vms.get(vm_uuid, self._empty_vm)
        answer = self._series(store, range_name, now)
        view = self.sampler.vms.get(vm_uuid)
        if view is not None and view.stats is not None and view.stats.uncounted_nics:
            answer["notes"] = [
                f"{nic} uses QEMU's user-mode network, which has no traffic counters"
                for nic in view.stats.uncounted_nics
            ]
        return answer

    def host_series(self, range_name: str, now: float | None = None) -> dict[str, Any]:
        answer = self._series(self.host, range_name, now)
        answer["current"] = self.sampler.current_host()
        return answer

    def _series(self, store: RoundRobin, range_name: str, now: float | None) -> dict[str, Any]:
        if range_name not in RANGE_NAMES:
            raise UnknownRange(range_name)
        step, timestamps, series = store.fetch(range_name, time.time() if now is None else now)
        return {"range": range_name, "step": step, "timestamps": timestamps, "series": series}

    def prometheus_text(self) -> str:
        views = sorted(self.sampler.vms.values(), key=lambda v: v.name)
        return prometheus.render(self.sampler.host, views, self.sampler.duration)

    @property
    def resident_bytes(self) -> int:
        """Bytes held by every store's rings (the part that grows with VMs)."""
        return self.host.nbytes + sum(store.nbytes for store in self.vms.values())
