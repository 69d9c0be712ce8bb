"""One sampling tick: the host's counters and every running VM's, turned into rows.

The sampler keeps the previous counters of each source (rates need two
samples) and the latest ones (what /metrics exports). It reads the VM list
from the database each tick, so a renamed VM is exported under its new name and
a deleted one is noticed within a tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from vmhive.hypervisor.base import Driver, VmStats
from vmhive.metrics.host import HostCounters, read_host
from vmhive.metrics.prometheus import VmView
from vmhive.metrics.rates import Sample, host_row, vm_row
from vmhive.store.models import Vm

log = logging.getLogger(__name__)

STATS_DEADLINE = 3.0  # one VM's counters; a monitor that hangs costs that VM its sample


@dataclass
class Tick:
    """What one tick measured, ready for the round-robin stores."""

    at: float  # unix time
    host: list[float]
    vms: dict[str, list[float]] = field(default_factory=dict)  # uuid -> row
    known: set[str] = field(default_factory=set)  # uuids of every VM that exists


class Sampler:
    def __init__(
        self, sessions: async_sessionmaker[Any], driver: Driver, storage_paths: Sequence[Path]
    ) -> None:
        self.sessions = sessions
        self.driver = driver
        self.storage_paths = tuple(storage_paths)
        self.host: HostCounters | None = None
        self.host_row: list[float] | None = None
        self.vms: dict[str, VmView] = {}  # uuid -> latest, every known VM
        self.previous: dict[str, Sample] = {}
        self.duration = 0.0  # seconds the last tick took

    async def tick(self, now: float | None = None) -> Tick:
        began = time.perf_counter()
        at = time.time() if now is None else now
        host = await asyncio.to_thread(read_host, self.storage_paths)
        tick = Tick(at=at, host=host_row(self.host, host))
        self.host, self.host_row = host, tick.host
        async with self.sessions() as session:
            rows = await session.execute(
                select(Vm.uuid, Vm.name).where(Vm.state.not_in(("creating", "deleting")))
            )
            names = dict(rows.all())
        tick.known = set(names)
        counters = await self._all_stats([u for u in names if self.driver.is_running(u)])
        views: dict[str, VmView] = {}
        previous, self.previous = self.previous, {}  # stopped and deleted VMs drop out
        for uuid, name in names.items():
            stats = counters.get(uuid)
            views[uuid] = VmView(name, uuid, uuid in counters, stats)
            if stats is not None:
                tick.vms[uuid] = vm_row(previous.get(uuid), at, stats)
                self.previous[uuid] = (at, stats)
        self.vms = views
        self.duration = time.perf_counter() - began
        return tick

    async def _all_stats(self, running: list[str]) -> dict[str, VmStats | None]:
        """Every running VM's counters, asked concurrently under one deadline; a VM
        that fails or does not answer in time gets None, the others their sample."""
        tasks = {uuid: asyncio.ensure_future(self.driver.stats(uuid)) for uuid in running}
        if not tasks:
            return {}
        _, late = await asyncio.wait(tasks.values(), timeout=STATS_DEADLINE)
        for task in late:
            task.cancel()
        counters: dict[str, VmStats | None] = {}
        for uuid, task in tasks.items():
            counters[uuid] = None
            if task in late:
                log.debug("no metrics for VM %s: no answer in %g s", uuid, STATS_DEADLINE)
            elif task.exception() is not None:
                log.debug("no metrics for VM %s: %s", uuid, task.exception())
            else:
                counters[uuid] = task.result()
        return counters

    def current_host(self) -> dict[str, float | int | None]:
        host, row = self.host, self.host_row
        if host is None or row is None:
            return {}
        return {
            "cpu_percent": None if math.isnan(row[0]) else round(row[0], 2),
            "memory_used_bytes": host.memory_used_bytes,
            "memory_total_bytes": host.memory_total_bytes,
            "storage_used_bytes": host.storage_used_bytes,
            "storage_total_bytes": host.storage_total_bytes,
            "cpus": host.cpus,
        }
