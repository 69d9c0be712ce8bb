"""The nodes of a cluster: registration, heartbeat, drain, removal, placement.

Every daemon is a node. At start it registers itself in the `nodes` table (by
name; a new incarnation each start) and adopts the VMs that have no node yet
(those of a single host from before nodes existed). Its agent loop refreshes
the heartbeat and free storage; a node whose heartbeat is older than
NODE_TIMEOUT shows as offline and is never chosen for new VMs. On SQLite there
is exactly one node; on PostgreSQL every daemon of the cluster sees them all.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.services.host import _mem_total_mib
from vmhive.services.placement import Candidate, Demand, Verdict, place
from vmhive.store.models import Job, Node, Setting, Vm, utcnow

NODE_TIMEOUT = timedelta(seconds=30)
# How old the usage placement decides on may be. This node's own changes (a VM
# created, started, stopped, deleted here) drop it at once; other nodes' show
# within this time, as their heartbeats do.
USAGE_MAX_AGE = 2.0
CLUSTER_SECRET = "cluster.secret"
# How one node calls another: the cluster secret as bearer token, the user the
# call is made for, and the calling node (a relayed request is never relayed again).
FORWARDED_USER = "x-vmhive-user"
FORWARDED_BY = "x-vmhive-forwarded-by"
# VMs that hold their memory and vCPUs on a node: running, or meant to run.
HOLDING = ("starting", "running", "paused", "stopping")


@dataclass(frozen=True)
class NodeAddress:
    name: str
    address: str  # host:port of its API


@dataclass(frozen=True)
class NodeView:
    name: str
    address: str
    online: bool
    drained: bool
    cpus: int
    memory_mib: int
    storage_bytes: int
    storage_free_bytes: int
    qemu_version: str
    accel: str
    incarnation: int
    heartbeat_at: datetime
    joined_at: datetime
    vms: int
    running: int
    vcpus_used: int
    memory_used_mib: int
    groups: frozenset[str]
    pools: frozenset[str] | None = None  # the pools it can use; None: not reported yet

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("groups", "pools")}
        data["pools"] = None if self.pools is None else sorted(self.pools)
        data["heartbeat_at"] = self.heartbeat_at.isoformat()
        data["joined_at"] = self.joined_at.isoformat()
        data["status"] = "online" if self.online else "offline"
        return data

    @property
    def reach(self) -> NodeAddress:
        return NodeAddress(self.name, self.address)

    def candidate(self) -> Candidate:
        return Candidate(
            name=self.name,
            online=self.online,
            drained=self.drained,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            storage_free_bytes=self.storage_free_bytes,
            vcpus_used=self.vcpus_used,
            memory_used_mib=self.memory_used_mib,
            vms=self.vms,
            groups=self.groups,
            pools=self.pools,
        )


class NodeService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.name = ctx.settings.node_name or socket.gethostname()
        self.id: int | None = None
        self.secret = ""  # the cluster secret: how nodes authenticate to each other
        self._usage: tuple[float, Sequence[Candidate]] | None = None
        ctx.events.listeners.append(lambda _kind, _data: self.forget_usage())

    def _storage(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self.ctx.settings.data_dir)
        return usage.total, usage.free

    async def register(self) -> None:
        """Join the cluster (or the single host's table) as this node."""
        settings = self.ctx.settings
        address = settings.node_address or settings.listen
        total, free = await asyncio.to_thread(self._storage)
        facts = {
            "address": address,
            "cpus": os.cpu_count() or 1,
            "memory_mib": _mem_total_mib(),
            "storage_bytes": total,
            "storage_free_bytes": free,
            "qemu_version": self.ctx.host.qemu_version[:32],
            "accel": self.ctx.host.accel.accel,
            "heartbeat_at": utcnow(),
        }
        async with self.ctx.sessions() as session:
            node = await session.scalar(select(Node).where(Node.name == self.name))
            if node is None:
                node = Node(name=self.name, incarnation=1, **facts)
                session.add(node)
            else:
                fresh = utcnow() - node.heartbeat_at < NODE_TIMEOUT
                if fresh and node.address != address:
                    raise Conflict(
                        f"node {self.name} is alive at {node.address}: "
                        "give this daemon another --node-name"
                    )
                for key, value in facts.items():
                    setattr(node, key, value)
                node.incarnation += 1
            await session.flush()
            self.id = node.id
            await session.execute(update(Vm).where(Vm.node_id.is_(None)).values(node_id=node.id))
            await session.execute(update(Job).where(Job.node_id.is_(None)).values(node_id=node.id))
            await session.commit()
        self.ctx.node_id = self.id
        self.ctx.runner.node_id = self.id
        self.secret = await self._cluster_secret()

    async def _cluster_secret(self) -> str:
        """The first node of a cluster makes it; the others read it from the database
        (whoever can read the database controls the cluster anyway)."""
        async with self.ctx.sessions() as session:
            row = await session.get(Setting, CLUSTER_SECRET)
            if row is not None:
                return row.value
            session.add(Setting(key=CLUSTER_SECRET, value=secrets.token_urlsafe(32)))
            try:
                await session.commit()
            except IntegrityError:  # another node made it at the same instant
                await session.rollback()
        async with self.ctx.sessions() as session:
            row = await session.get(Setting, CLUSTER_SECRET)
            assert row is not None
            return row.value

    def call_headers(self, user: str = "node") -> dict[str, str]:
        """The headers of a call from this node to another, on `user`'s behalf."""
        return {
            "authorization": f"Bearer {self.secret}",
            FORWARDED_USER: user or "node",
            FORWARDED_BY: self.name,
        }

    async def owner(self, vm_name: str) -> NodeAddress | None:
        """The node that owns a VM, when that is another node than this one."""
        async with self.ctx.sessions() as session:
            row = (
                await session.execute(
                    select(Node.id, Node.name, Node.address)
                    .join(Vm, Vm.node_id == Node.id)
                    .where(Vm.name == vm_name)
                )
            ).one_or_none()
        if row is None or row.id == self.id:
            return None
        return NodeAddress(row.name, row.address)

    async def address_of(self, name: str) -> NodeAddress:
        async with self.ctx.sessions() as session:
            address = await session.scalar(select(Node.address).where(Node.name == name))
        if address is None:
            raise NotFound(f"no node named {name!r}")
        return NodeAddress(name, address)

    async def heartbeat(self, pools: list[str] | None = None) -> None:
        """Alive, with the free storage and (when given) the pools this node can use."""
        _total, free = await asyncio.to_thread(self._storage)
        facts: dict[str, Any] = {"heartbeat_at": utcnow(), "storage_free_bytes": free}
        if pools is not None:
            facts["pools"] = pools
        async with self.ctx.sessions() as session:
            await session.execute(update(Node).where(Node.id == self.id).values(**facts))
            await session.commit()

    # -- views ------------------------------------------------------------------

    async def list(self) -> list[NodeView]:
        now = utcnow()
        async with self.ctx.sessions() as session:
            nodes = list(await session.scalars(select(Node).order_by(Node.name)))
            usage = {
                row.node_id: row
                for row in await session.execute(
                    select(
                        Vm.node_id,
                        func.count().label("vms"),
                        func.sum(Vm.vcpus).filter(Vm.state.in_(HOLDING)).label("vcpus"),
                        func.sum(Vm.memory_mib).filter(Vm.state.in_(HOLDING)).label("memory"),
                        func.count().filter(Vm.state.in_(HOLDING)).label("running"),
                    ).group_by(Vm.node_id)
                )
            }
            groups: dict[int | None, set[str]] = {}
            for node_id, group in await session.execute(
                select(Vm.node_id, Vm.affinity_group).where(Vm.affinity_group.is_not(None))
            ):
                groups.setdefault(node_id, set()).add(group)
        views = []
        for node in nodes:
            used = usage.get(node.id)
            views.append(
                NodeView(
                    name=node.name,
                    address=node.address,
                    online=now - node.heartbeat_at < NODE_TIMEOUT,
                    drained=node.drained,
                    cpus=node.cpus,
                    memory_mib=node.memory_mib,
                    storage_bytes=node.storage_bytes,
                    storage_free_bytes=node.storage_free_bytes,
                    qemu_version=node.qemu_version,
                    accel=node.accel,
                    incarnation=node.incarnation,
                    heartbeat_at=node.heartbeat_at,
                    joined_at=node.joined_at,
                    vms=used.vms if used else 0,
                    running=used.running or 0 if used else 0,
                    vcpus_used=used.vcpus or 0 if used else 0,
                    memory_used_mib=used.memory or 0 if used else 0,
                    groups=frozenset(groups.get(node.id, ())),
                    pools=None if node.pools is None else frozenset(node.pools),
                )
            )
        return views

    async def get(self, name: str) -> NodeView:
        for view in await self.list():
            if view.name == name:
                return view
        raise NotFound(f"no node named {name!r}")

    async def names_by_id(self) -> dict[int, str]:
        async with self.ctx.sessions() as session:
            rows = await session.execute(select(Node.id, Node.name))
            return {node_id: name for node_id, name in rows}

    # -- changes ----------------------------------------------------------------

    async def set_drained(self, name: str, drained: bool) -> NodeView:
        """Drained: no new VM is placed there (moving its VMs away: MigrationService.drain)."""
        async with self.ctx.sessions() as session:
            changed = await session.execute(
                update(Node).where(Node.name == name).values(drained=drained).returning(Node.id)
            )
            if changed.one_or_none() is None:
                raise NotFound(f"no node named {name!r}")
            await session.commit()
        self.forget_usage()
        return await self.get(name)

    async def remove(self, name: str) -> None:
        """Forget a node that is gone: only when offline and owning no VM."""
        view = await self.get(name)
        if name == self.name:
            raise Conflict(f"node {name} is this daemon: remove it from another node")
        if view.online:
            raise Conflict(f"node {name} is online: stop its daemon first")
        if view.vms:
            raise Conflict(f"node {name} still owns {view.vms} VMs: move or delete them first")
        async with self.ctx.sessions() as session:
            node = await session.scalar(select(Node).where(Node.name == name))
            if node is not None:
                await session.delete(node)
            await session.commit()

    # -- placement --------------------------------------------------------------

    def forget_usage(self) -> None:
        self._usage = None

    async def candidates(self) -> Sequence[Candidate]:
        """Every node as placement sees it, read again when older than USAGE_MAX_AGE
        (reading the cluster's usage costs far more than deciding on it)."""
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > USAGE_MAX_AGE:
            self._usage = (now, [view.candidate() for view in await self.list()])
        return self._usage[1]

    async def place(self, demand: Demand, strategy: str = "spread") -> Verdict:
        try:
            return place(demand, await self.candidates(), strategy)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
