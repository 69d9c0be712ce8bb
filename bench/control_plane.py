"""Benchmark: the control plane at cluster scale, over the fake driver (issue 7).

Goals: with 100 nodes x 100 VMs registered, listing all VMs takes under 1 s and
placing 1,000 VMs under 10 s.

For each store (SQLite in the data dir, then PostgreSQL from tests/pg.py) a
whole daemon starts over `FakeDriver` on a temp data dir, and its ASGI app is
called in process through httpx (bearer token, auth wrapper included; no
socket, so the HTTP server itself is not in the numbers). Setup, not measured:
100 node rows (64 CPUs, 256 GiB, 10 TiB each; three drained) and 10,000 VM rows
(100 a node, 30-70 % of each node's running, 1-3 qcow2 disks and one virtio
NIC each, a third with a CD-ROM drive, half of those holding an ISO, a fifth
with cloud-init, a tenth in anti-affinity groups), inserted
in bulk through SQLAlchemy. The daemon's own node is a 101st node, owning no
VM, so its agent leaves the rows alone. Heartbeats are refreshed before every
operation, so all nodes count as online.

Measured, each after a warm-up (one run; 20 calls for the placements):

- GET /api/vms: all 10,000 VMs as JSON;
- GET /api/nodes: the 101 nodes with their usage;
- placement: 1,000 POST /api/placement calls in a row, varied demands;
- NodeService.place: the same 1,000 demands without HTTP (gathering the
  nodes' usage from the database, then choosing);
- pure place(): the same 1,000 demands over the 101 candidates, no database.

A missed goal is profiled (cProfile around one more run) and its top costs
printed after the table; `--profile` profiles the operations with a goal
even when they meet it, to see where the remaining time goes.

Usage: .venv/bin/python bench/control_plane.py [--store sqlite|postgresql|both]
    [--runs 3] [--placement-runs 2] [--profile]

With the defaults a run of both stores takes under a minute on the 2-core
build machine; the 1,000 placements also give the median and max of a single
call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import event, insert, update
from tests.pg import PgServer, PgUnavailable

from vmhive.api.app import create_app, wrap
from vmhive.config import Settings
from vmhive.daemon import Daemon, freeze_long_lived
from vmhive.hypervisor.fake import FakeDriver
from vmhive.services.placement import Candidate, Demand, place
from vmhive.storage.cloudinit import CloudInitConfig
from vmhive.store.models import Base, Node

NODES = 100
VMS_PER_NODE = 100
PLACEMENTS = 1000
SERVICE_PLACEMENTS = 200  # without HTTP: enough to compare per call
PLACEMENT_WARM_UP = 20
ONE_PLACEMENT = "one POST /api/placement (each of those calls)"
GIB = 1024**3
NODE_CPUS = 64
NODE_MEMORY_MIB = 256 * 1024
NODE_STORAGE = 10 * 1024 * GIB
DRAINED = 3
AFFINITY_GROUPS = 30
TABLES = Base.metadata.tables
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC7bench0000000000000000000000000000000000 ops@bench"


@dataclass
class Result:
    store: str
    operation: str
    samples: list[float]
    goal: float | None = None  # seconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else max(self.samples) < self.goal


def shown(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- setup --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(db_url: str | None) -> AsyncIterator[tuple[Daemon, httpx.AsyncClient]]:
    """A daemon over the fake driver and an HTTP client bound to its ASGI app."""
    data = Path(tempfile.mkdtemp(prefix="vh-bench-", dir="/tmp"))
    settings = Settings(
        data_dir=data,
        db_url=db_url,
        accel="tcg",
        create_demo=False,
        stop_timeout=0.5,
        node_name="bench-self",
    )
    daemon = Daemon(settings, FakeDriver())
    try:
        await daemon.start()
        app = wrap(create_app(daemon), daemon)
        freeze_long_lived()  # as `vmhive serve` does
        headers = {"Authorization": f"Bearer {daemon.token}"}
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers
            ) as http:
                yield daemon, http
        finally:
            await daemon.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def node_rows(now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "name": f"node-{n:03d}",
            "address": f"10.1.{n // 200}.{n % 200 + 10}:8006",
            "cpus": NODE_CPUS,
            "memory_mib": NODE_MEMORY_MIB,
            "storage_bytes": NODE_STORAGE,
            "storage_free_bytes": NODE_STORAGE * (40 + n % 50) // 100,
            "qemu_version": "7.2.22",
            "accel": "kvm",
            "drained": n < DRAINED,
            "incarnation": 1 + n % 4,
            "joined_at": now,
            "heartbeat_at": now,
        }
        for n in range(NODES)
    ]


def vm_rows(
    rng: random.Random, node_ids: list[int], machines: dict[int, str], now: datetime
) -> list[dict[str, Any]]:
    rows = []
    for n, node_id in enumerate(node_ids):
        running_share = 0.3 + 0.4 * n / max(NODES - 1, 1)
        for i in range(VMS_PER_NODE):
            name = f"vm-{n:03d}-{i:02d}"
            generation = 2 if rng.random() < 0.8 else 1
            running = rng.random() < running_share
            state = ("paused" if rng.random() < 0.03 else "running") if running else "stopped"
            cloud = rng.random() < 0.2
            config = CloudInitConfig(hostname=name, ssh_keys=(SSH_KEY,)) if cloud else None
            rows.append(
                {
                    "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "name": name,
                    "description": "bench VM" if i % 5 == 0 else "",
                    "generation": generation,
                    "vcpus": rng.choice((1, 1, 2, 2, 2, 4, 4, 8)),
                    "memory_mib": rng.choice((512, 1024, 2048, 2048, 4096, 8192)),
                    "machine": machines[generation],
                    "boot_order": "disk,cdrom,network",
                    "kernel": None,
                    "initrd": None,
                    "cmdline": None,
                    "autostart": running and rng.random() < 0.5,
                    "is_template": False,
                    "cloudinit": cloud,
                    "cloudinit_instance_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "cloudinit_config": config.to_json() if config else None,
                    "desired_state": "running" if running else "stopped",
                    "state": state,
                    "state_reason": "",
                    "pid": rng.randrange(1000, 4_000_000) if running else None,
                    "accel": "kvm" if running else None,
                    "node_id": node_id,
                    "affinity_group": (
                        f"ha-{rng.randrange(AFFINITY_GROUPS)}" if rng.random() < 0.1 else None
                    ),
                    "created_at": now,
                    "updated_at": now,
                }
            )
    return rows


def device_rows(
    rng: random.Random, vms: list[dict[str, Any]], vm_ids: list[int], first: int, vms_dir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Disks, CD-ROMs and NICs of `vms`; `first`: the number of the first VM (for its MAC)."""
    disks, cdroms, nics = [], [], []
    for number, (vm, vm_id) in enumerate(zip(vms, vm_ids, strict=True), start=first):
        for index in range(rng.choice((1, 1, 2, 2, 3))):
            overlay = index == 0
            disks.append(
                {
                    "vm_id": vm_id,
                    "index": index,
                    "path": str(vms_dir / vm["uuid"] / f"disk{index}.qcow2"),
                    "format": "qcow2",
                    "size_bytes": rng.choice((10, 20, 40)) * GIB
                    if overlay
                    else rng.choice((20, 50, 100, 200)) * GIB,
                    "source": "overlay" if overlay else "blank",
                    "image": rng.choice(("debian-12", "tiny")) if overlay else None,
                    "volume_id": None,
                    "base_disk_id": None,
                }
            )
        if rng.random() < 1 / 3:
            iso = rng.choice((None, "/var/lib/vmhive/isos/debian-12.7.0-amd64-netinst.iso"))
            cdroms.append({"vm_id": vm_id, "index": 0, "iso": iso})
        nics.append(
            {
                "vm_id": vm_id,
                "index": 0,
                "mac": "52:54:00:" + ":".join(f"{b:02x}" for b in number.to_bytes(3, "big")),
                "model": "virtio-net-pci",
                "backend": "user",
                "network_id": None,
                "ip": None,
                "vlan": None,
                "link_up": True,
            }
        )
    return disks, cdroms, nics


async def populate(daemon: Daemon) -> tuple[int, int, int]:
    """The cluster's rows, in bulk; returns how many disks, CD-ROMs and NICs were made.
    One transaction per ten nodes' VMs, so the daemon's own writes (its
    heartbeat) get in between on SQLite."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    nodes, vms_table = TABLES["nodes"], TABLES["vms"]
    async with daemon.sessions() as session:
        node_ids = list(
            await session.scalars(
                insert(nodes).returning(nodes.c.id, sort_by_parameter_order=True), node_rows(now)
            )
        )
        await session.commit()
    vms = vm_rows(rng, node_ids, daemon.host.machines, now)
    disk_count = cdrom_count = nic_count = 0
    chunk = 10 * VMS_PER_NODE
    for start in range(0, len(vms), chunk):
        part = vms[start : start + chunk]
        async with daemon.sessions() as session:
            vm_ids = list(
                await session.scalars(
                    insert(vms_table).returning(vms_table.c.id, sort_by_parameter_order=True),
                    part,
                )
            )
            disks, cdroms, nics = device_rows(rng, part, vm_ids, start, daemon.settings.vms_dir)
            await session.execute(insert(TABLES["disks"]), disks)
            await session.execute(insert(TABLES["cdroms"]), cdroms)
            await session.execute(insert(TABLES["nics"]), nics)
            await session.commit()
        disk_count += len(disks)
        cdrom_count += len(cdroms)
        nic_count += len(nics)
    return disk_count, cdrom_count, nic_count


async def refresh_heartbeats(daemon: Daemon) -> None:
    async with daemon.sessions() as session:
        await session.execute(update(Node).values(heartbeat_at=datetime.now(UTC)))
        await session.commit()


def demands() -> list[tuple[Demand, str]]:
    rng = random.Random(11)
    return [
        (
            Demand(
                vcpus=rng.choice((1, 2, 2, 4, 8)),
                memory_mib=rng.choice((512, 1024, 2048, 4096, 8192, 16384)),
                storage_bytes=rng.choice((10, 20, 100)) * GIB,
                affinity_group=(
                    f"ha-{rng.randrange(AFFINITY_GROUPS)}" if rng.random() < 0.2 else None
                ),
            ),
            "pack" if rng.random() < 0.2 else "spread",
        )
        for _ in range(PLACEMENTS)
    ]


# -- measured operations ----------------------------------------------------------

Operation = Callable[[], Awaitable[Any]]


@dataclass
class Measured:
    name: str
    operation: Operation
    runs: int
    goal: float | None = None
    warm_up: Operation | None = None  # None: one run of the operation itself
    check: Callable[[Any], None] | None = None  # on the warm-up's answer, not timed


async def get_json(http: httpx.AsyncClient, path: str) -> httpx.Response:
    response = await http.get(path)
    assert response.status_code == 200, response.text
    return response


def count_of(expected: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert len(response.json()) == expected, len(response.json())

    return check


async def place_over_http(
    http: httpx.AsyncClient, work: list[tuple[Demand, str]], calls: list[float] | None = None
) -> int:
    """How many demands found a node; `calls`: gets each call's seconds."""
    placed = 0
    for demand, strategy in work:
        began = time.perf_counter()
        body = {
            "vcpus": demand.vcpus,
            "memory_mib": demand.memory_mib,
            "storage_bytes": demand.storage_bytes,
            "affinity_group": demand.affinity_group,
            "strategy": strategy,
        }
        response = await http.post("/api/placement", json=body)
        if calls is not None:
            calls.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
        placed += response.json()["node"] is not None
    return placed


def mostly_placed(placed: int) -> None:
    """Most warm-up demands fit somewhere: the cluster is not simply full."""
    assert placed >= PLACEMENT_WARM_UP * 0.9, f"only {placed} of {PLACEMENT_WARM_UP} found a node"


async def place_in_service(daemon: Daemon, work: list[tuple[Demand, str]]) -> None:
    for demand, strategy in work:
        await daemon.nodes.place(demand, strategy)


def place_pure(candidates: list[Candidate], work: list[tuple[Demand, str]]) -> None:
    for demand, strategy in work:
        place(demand, candidates, strategy)


async def timed(daemon: Daemon, measured: Measured) -> list[float]:
    """Seconds per run, after a warm-up; heartbeats kept fresh (not timed)."""
    await refresh_heartbeats(daemon)
    answer = await (measured.warm_up or measured.operation)()
    if measured.check is not None:
        measured.check(answer)
    samples = []
    for _ in range(measured.runs):
        await refresh_heartbeats(daemon)
        began = time.perf_counter()
        await measured.operation()
        samples.append(time.perf_counter() - began)
    return samples


@contextlib.contextmanager
def sql_time(daemon: Daemon) -> Iterator[dict[str, list[float]]]:
    """Wall time per SQL statement (as the caller waits for it, rows fetched):
    {statement: [executions, seconds]}."""
    spent: dict[str, list[float]] = {}
    engine = daemon.engine.sync_engine

    def before(conn: Any, _cursor: Any, _statement: str, *_args: Any) -> None:
        conn.info.setdefault("bench_began", []).append(time.perf_counter())

    def after(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        pending = conn.info.get("bench_began")
        if not pending:  # began before the listeners were added (a background task)
            return
        took = time.perf_counter() - pending.pop()
        entry = spent.setdefault(" ".join(statement.split())[:110], [0, 0.0])
        entry[0] += 1
        entry[1] += took

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield spent
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


async def profile(daemon: Daemon, operation: Operation, count: int = 10) -> list[str]:
    """One run under cProfile: the SQL statements that took longest, then the
    Python functions with the most own time (SQLite's work happens in
    aiosqlite's thread, which the profile shows as the event loop's wait)."""
    await refresh_heartbeats(daemon)
    profiler = cProfile.Profile()
    with sql_time(daemon) as spent:
        began = time.perf_counter()
        profiler.enable()
        await operation()
        profiler.disable()
        took = time.perf_counter() - began
    lines = [f"  total {took:.2f} s under the profiler; SQL, as waited for:"]
    for statement, (executions, seconds) in sorted(
        spent.items(), key=lambda item: item[1][1], reverse=True
    )[:4]:
        lines.append(f"  {seconds:6.3f} s {int(executions):>6} x  {statement}")
    lines.append("  Python, by own time:")
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for (file, line, function), (_calls, ncalls, own, cumulative, _callers) in sorted(
        entries.items(), key=lambda item: item[1][2], reverse=True
    )[:count]:
        where = f"{Path(file).name}:{line}" if line else file
        lines.append(
            f"  {own:6.3f} s own {cumulative:6.3f} s cum {ncalls:>8} calls  {function} ({where})"
        )
    return lines


async def bench_store(
    store: str, db_url: str | None, runs: int, placement_runs: int, profile_all: bool = False
) -> list[Result]:
    results = []
    async with started(db_url) as (daemon, http):
        began = time.perf_counter()
        disks, cdroms, nics = await populate(daemon)
        took = time.perf_counter() - began
        print(
            f"{store}: setup inserted {NODES} nodes, {NODES * VMS_PER_NODE} VMs, "
            f"{disks} disks, {cdroms} CD-ROMs, {nics} NICs in {took:.1f} s",
            flush=True,
        )
        work = demands()
        await refresh_heartbeats(daemon)
        candidates = [view.candidate() for view in await daemon.nodes.list()]

        async def pure() -> None:
            place_pure(candidates, work)

        service_work = work[:SERVICE_PLACEMENTS]
        calls: list[float] = []  # each placement call of the measured runs
        measured = [
            Measured(
                "GET /api/vms (10,000 VMs)",
                lambda: get_json(http, "/api/vms"),
                runs,
                goal=1.0,
                check=count_of(NODES * VMS_PER_NODE),
            ),
            Measured(
                "GET /api/nodes (101 nodes)",
                lambda: get_json(http, "/api/nodes"),
                runs,
                check=count_of(NODES + 1),
            ),
            Measured(
                "1,000 x POST /api/placement",
                lambda: place_over_http(http, work, calls),
                placement_runs,
                goal=10.0,
                # The full 1,000 once as the warm-up would double this row's cost.
                warm_up=lambda: place_over_http(http, work[:PLACEMENT_WARM_UP]),
                check=mostly_placed,
            ),
            Measured(
                f"{SERVICE_PLACEMENTS} x NodeService.place (no HTTP)",
                lambda: place_in_service(daemon, service_work),
                placement_runs,
            ),
            Measured("1,000 x pure place() (101 candidates)", pure, runs),
        ]
        for item in measured:
            samples = await timed(daemon, item)
            results.append(Result(store, item.name, samples, item.goal))
            print(f"  {item.name}: median {shown(statistics.median(samples))}", flush=True)
            if calls and not any(r.operation == ONE_PLACEMENT for r in results):
                results.append(Result(store, ONE_PLACEMENT, calls))
        for item in measured:
            result = next(r for r in results if r.operation == item.name)
            if result.met is not None and (profile_all or not result.met):
                # A tenth of the placements is enough to see where their time goes.
                operation = (
                    (lambda: place_over_http(http, work[:100]))
                    if item.goal == 10.0
                    else item.operation
                )
                print(f"\n{store}, {item.name}: profile of one more run")
                print("\n".join(await profile(daemon, operation)), flush=True)
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| store | operation | median | max | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        goal = f"< {shown(r.goal)}" if r.goal is not None else "-"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.store} | {r.operation} | {shown(r.median)} | {shown(max(r.samples))} "
            f"| {goal} | {met} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--runs", type=int, default=3, help="runs of the quick operations")
    parser.add_argument("--placement-runs", type=int, default=2, help="runs of 1,000 placements")
    parser.add_argument(
        "--profile", action="store_true", help="profile the operations with a goal even if met"
    )
    args = parser.parse_args()
    results: list[Result] = []
    if args.store in ("sqlite", "both"):
        results += asyncio.run(
            bench_store("SQLite", None, args.runs, args.placement_runs, args.profile)
        )
    if args.store in ("postgresql", "both"):
        try:
            pg = PgServer.start()
        except PgUnavailable as exc:
            print(f"PostgreSQL skipped: {exc}")
        else:
            try:
                url = pg.create_database("bench")
                results += asyncio.run(
                    bench_store("PostgreSQL", url, args.runs, args.placement_runs, args.profile)
                )
            finally:
                pg.stop()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{NODES} nodes x {VMS_PER_NODE} VMs, fake driver, in-process ASGI; "
        f"{args.runs} runs ({args.placement_runs} for placements) after a warm-up; "
        f"load average {load}; {os.cpu_count()} CPUs\n"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
