"""Virtual switches: networks, VM NICs on them, DHCP reservations, port forwards.

The database says what should exist; `vmhive.network` makes the host match.
Host changes run in threads (netlink and subprocesses block) and one at a
time (`_host`), and the nftables ruleset is always rendered whole from the
database plus the addresses the DHCP servers handed out, so every change is
a single atomic replacement. A VM's TAPs exist while it runs: created before
QEMU starts, removed when it stops.

In a cluster the networks are rows of the shared database: a node sets up
every network at its start, the node that creates one sets it up at once,
and any other node sets it up (bridge, gateway address, DHCP server) when a
VM started or migrated in there first needs it (`plug`). Each node's copy
has the same subnet and gateway, so a migrated VM keeps its address. A
network deleted through one node is taken down by the others at their next
heartbeat (`take_down_deleted`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from vmhive import network as hostnet
from vmhive.hypervisor.base import DriverError
from vmhive.hypervisor.spec import NicSpec
from vmhive.jobs.runner import JobContext, JobError
from vmhive.network.dnsmasq import stop_dnsmasq
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.store.models import Event, Network, Nic, PortForward, Setting, Vm

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_NETWORK = "default"
DEFAULT_NETWORK_SETTING = "default_network_created"
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000"}
MAX_NICS = 8


@dataclass(frozen=True)
class NetworkRequest:
    name: str
    type: str = "nat"
    subnet: str | None = None
    gateway: str | None = None
    dhcp_start: str | None = None
    dhcp_end: str | None = None
    uplink: str | None = None
    bridge: str | None = None
    domain: str | None = None


def model_of(row: Network) -> hostnet.Network:
    """The host library's description of a stored network."""
    return hostnet.define_network(
        row.name,
        row.type,
        subnet=row.subnet,
        gateway=row.gateway,
        dhcp_range=(row.dhcp_start, row.dhcp_end) if row.dhcp_start and row.dhcp_end else None,
        uplink=row.uplink,
        bridge=row.bridge,
        domain=row.domain,
    )


def nic_spec(vm: Vm, nic: Nic) -> NicSpec:
    return next(s for n, s in zip(vm.nics, specs.nic_specs(vm), strict=True) if n.id == nic.id)


class NetworkService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._host = asyncio.Lock()
        self._leases: dict[str, ipaddress.IPv4Address] = {}  # MAC -> address handed out
        self._firewall_loaded = False
        # The networks this host provides, by id: what to take down if another
        # node deletes one (`take_down_deleted`).
        self._set_up: dict[int, hostnet.Network] = {}

    @property
    def run_dir(self) -> Path:
        return self.ctx.settings.net_run_dir

    async def _on_host(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A host change: in a thread, one at a time, errors as one-line messages."""
        async with self._host:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except hostnet.NetworkError as exc:
                raise JobError(str(exc)) from exc

    # -- queries --------------------------------------------------------------------

    async def list_networks(self) -> list[tuple[Network, int]]:
        async with self.ctx.sessions() as session:
            rows = list(await session.scalars(select(Network).order_by(Network.name)))
            grouped = await session.execute(
                select(Nic.network_id, func.count()).group_by(Nic.network_id)
            )
            counts = {network_id: count for network_id, count in grouped.tuples()}
        return [(row, counts.get(row.id, 0)) for row in rows]

    async def get(self, name: str) -> Network:
        async with self.ctx.sessions() as session:
            row = await session.scalar(select(Network).where(Network.name == name))
        if row is None:
            raise NotFound(f"no network named {name!r} (see `vmhive network list`)")
        return row

    async def show(self, name: str) -> dict[str, Any]:
        row = await self.get(name)
        leases = await self._read_leases([row])
        async with self.ctx.sessions() as session:
            nics = (
                await session.execute(
                    select(Vm.name, Nic)
                    .select_from(Nic)
                    .join(Vm, Nic.vm_id == Vm.id)
                    .where(Nic.network_id == row.id)
                    .order_by(Vm.name)
                )
            ).tuples()
            ports = [
                {"vm": vm_name, "nic": nic.index, "mac": nic.mac, "reserved_ip": nic.ip}
                for vm_name, nic in nics
            ]
        for port in ports:
            lease = leases.get(str(port["mac"]))
            port["ip"] = str(lease) if lease else None
        return {
            **self.describe(row),
            "ports": ports,
            "forwards": await self.list_forwards(name),
        }

    @staticmethod
    def describe(row: Network) -> dict[str, Any]:
        return {
            "name": row.name,
            "type": row.type,
            "bridge": row.bridge,
            "subnet": row.subnet,
            "gateway": row.gateway,
            "dhcp_range": [row.dhcp_start, row.dhcp_end] if row.dhcp_start else None,
            "uplink": row.uplink,
            "domain": row.domain,
            "created_at": row.created_at,
        }

    async def addresses(self, vm: Vm) -> dict[int, str | None]:
        """Each NIC's IPv4 address as its DHCP server handed it out (None: not yet)."""
        rows = [n.network for n in vm.nics if n.network is not None]
        leases = await self._read_leases(rows) if rows else {}
        return {n.index: str(leases[n.mac]) if n.mac in leases else None for n in vm.nics}

    def cached_lease(self, nic: Nic) -> str | None:
        return self.lease_of(nic.mac)

    def lease_of(self, mac: str) -> str | None:
        """The address DHCP last handed out to `mac`, as last read (no file read)."""
        lease = self._leases.get(mac)
        return str(lease) if lease else None

    def cached_address(self, nic: Nic) -> str | None:
        """The address rules use: the reservation, else the last lease seen."""
        return nic.ip or self.cached_lease(nic)

    async def _read_leases(self, rows: list[Network]) -> dict[str, ipaddress.IPv4Address]:
        def read() -> dict[str, ipaddress.IPv4Address]:
            found: dict[str, ipaddress.IPv4Address] = {}
            for row in rows:
                if row.type == "external":
                    continue
                try:
                    leases = hostnet.network_leases(model_of(row), self.run_dir)
                except (hostnet.NetworkError, OSError):
                    continue
                found.update({mac: lease.ipv4 for mac, lease in leases.items()})
            return found

        found = await asyncio.to_thread(read)
        self._leases.update(found)
        return found

    # -- networks ---------------------------------------------------------------------

    async def create(self, req: NetworkRequest) -> str:
        async with self.ctx.sessions() as session:
            if await session.scalar(select(Network).where(Network.name == req.name)):
                raise Conflict(f"a network named {req.name!r} already exists")
            others = list(await session.scalars(select(Network)))
        definition = await asyncio.to_thread(self._define, req, others)

        async def job(ctx: JobContext) -> dict[str, Any]:
            row = Network(
                name=definition.name,
                type=definition.type.value,
                bridge=definition.bridge,
                subnet=str(definition.subnet) if definition.subnet else None,
                gateway=str(definition.gateway) if definition.gateway else None,
                dhcp_start=str(definition.dhcp_range[0]) if definition.dhcp_range else None,
                dhcp_end=str(definition.dhcp_range[1]) if definition.dhcp_range else None,
                uplink=definition.uplink,
                domain=definition.domain,
            )
            async with self.ctx.sessions() as session:
                session.add(row)
                session.add(Event(kind="network", message=f"network {req.name} created"))
                try:
                    await session.commit()
                except IntegrityError:
                    raise JobError(f"a network named {req.name!r} already exists") from None
                row_id = row.id

            async def forget() -> None:
                async with self.ctx.sessions() as session:
                    stale = await session.get(Network, row_id)
                    if stale is not None:
                        await session.delete(stale)
                        await session.commit()

            ctx.on_rollback(f"forget network {req.name}", forget)
            ctx.on_rollback(
                f"take down network {req.name}",
                lambda: self._on_host(hostnet.remove_network, definition, self.run_dir),
            )
            await ctx.log(f"bridge {definition.bridge}, subnet {definition.subnet or '-'}")
            await self._on_host(hostnet.ensure_network, definition, self.run_dir)
            self._set_up[row_id] = definition
            await self.apply_firewall()
            return {"network": req.name, "bridge": definition.bridge}

        return await self.ctx.runner.submit(
            "network.create", f"network:{req.name}", job, params={"name": req.name}
        )

    def _define(self, req: NetworkRequest, others: list[Network]) -> hostnet.Network:
        """Validate the request and fill its defaults, the subnet included (in a thread)."""
        try:
            routed = req.type in ("nat", "internal", "private")
            used = hostnet.host_used_networks() + [
                hostnet.UsedNetwork(ipaddress.IPv4Network(o.subnet), f"network {o.name}")
                for o in others
                if o.subnet
            ]
            subnet: Any = req.subnet
            if routed and subnet is None:
                subnet = hostnet.choose_subnet(used)
            elif routed:
                subnet = hostnet.check_subnet(subnet, used)
            elif subnet is not None:
                raise InvalidRequest("an external network takes its addresses from the LAN")
            bridges = {o.bridge for o in others}
            definition = hostnet.define_network(
                req.name,
                req.type,
                subnet=subnet,
                gateway=req.gateway,
                dhcp_range=(req.dhcp_start, req.dhcp_end)
                if req.dhcp_start and req.dhcp_end
                else None,
                uplink=req.uplink,
                bridge=req.bridge,
                domain=req.domain,
            )
        except hostnet.NetworkError as exc:
            raise InvalidRequest(str(exc)) from None
        if definition.bridge in bridges:
            raise Conflict(f"bridge {definition.bridge} already belongs to another network")
        return definition

    async def delete(self, name: str) -> str:
        row = await self.get(name)
        async with self.ctx.sessions() as session:
            users = sorted(
                set(
                    await session.scalars(
                        select(Vm.name)
                        .join(Nic, Nic.vm_id == Vm.id)
                        .where(Nic.network_id == row.id)
                    )
                )
            )
        if users:
            raise Conflict(
                f"network {name} is in use by VM(s) {', '.join(users)}: remove their NICs first"
            )
        definition = model_of(row)

        async def job(ctx: JobContext) -> dict[str, Any]:
            async with self.ctx.sessions() as session:
                stale = await session.get(Network, row.id)
                if stale is not None:
                    await session.delete(stale)  # its forwards go with it
                    session.add(Event(kind="network", message=f"network {name} deleted"))
                    await session.commit()
            ctx.commit()
            self._set_up.pop(row.id, None)
            await self.apply_firewall()
            await self._on_host(hostnet.remove_network, definition, self.run_dir)
            await ctx.log(f"removed bridge {definition.bridge}, its DHCP server and rules")
            return {"network": name}

        return await self.ctx.runner.submit(
            "network.delete", f"network:{name}", job, params={"name": name}
        )

    async def ensure_default(self) -> None:
        """The nat network `default`, on the very first start (unless switched off)."""
        async with self.ctx.sessions() as session:
            if await session.get(Setting, DEFAULT_NETWORK_SETTING) is not None:
                return
            session.add(Setting(key=DEFAULT_NETWORK_SETTING, value="1"))
            await session.commit()
        try:
            job_id = await self.create(NetworkRequest(name=DEFAULT_NETWORK))
        except Conflict:
            return
        await self.ctx.runner.wait(job_id, 120)
        job = await self.ctx.runner.get(job_id)
        if job.state != "succeeded":
            log.error("could not create the default network: %s", job.error)

    # -- the host ---------------------------------------------------------------------

    async def restore(self) -> None:
        """At daemon start: every network present on the host (adopting what runs)."""
        async with self.ctx.sessions() as session:
            rows = list(await session.scalars(select(Network)))
        for row in rows:
            try:
                await self._set_up_here(row)
            except (JobError, hostnet.NetworkError) as exc:
                log.error("network %s could not be set up: %s", row.name, exc)

    async def _set_up_here(self, row: Network) -> None:
        definition = model_of(row)
        await self._on_host(
            hostnet.ensure_network,
            definition,
            self.run_dir,
            reservations=await self._reservations(row.id),
        )
        self._set_up[row.id] = definition

    async def take_down_deleted(self) -> None:
        """Networks deleted through another node: their bridge, DHCP server and rules
        go here too (each node's heartbeat)."""
        if not self._set_up:
            return
        async with self.ctx.sessions() as session:
            existing = set(await session.scalars(select(Network.id)))
        gone = {i: d for i, d in self._set_up.items() if i not in existing}
        if not gone:
            return
        for network_id in gone:
            del self._set_up[network_id]
        await self.apply_firewall()
        for definition in gone.values():
            log.info("network %s was deleted: taking it down here", definition.name)
            await self._on_host(hostnet.remove_network, definition, self.run_dir)

    async def sync_ports(self) -> None:
        """After the agent adopted VMs: TAPs of running VMs exist, others are gone."""
        async with self.ctx.sessions() as session:
            vms = list(
                await session.scalars(
                    select(Vm).where(Vm.nics.any(Nic.backend == "tap"), self.ctx.here())
                )
            )
        for vm in vms:
            if self.ctx.driver.is_running(vm.uuid):
                await self._ensure_taps(vm)
            else:
                await self._remove_taps(vm)
        await self.refresh()

    async def apply_firewall(self) -> None:
        """The whole ruleset from the database and the known addresses, in one go."""
        async with self.ctx.sessions() as session:
            networks = list(await session.scalars(select(Network)))
            rows = (
                await session.execute(
                    select(Vm, Nic)
                    .join(Nic, Nic.vm_id == Vm.id)
                    .where(Nic.backend == "tap", Nic.network_id.is_not(None))
                )
            ).tuples()
            ports = [
                hostnet.VmPort(hostnet.tap_name(vm.uuid, nic.index), nic.mac, self._ip_of(nic))
                for vm, nic in rows
                if self.ctx.driver.is_running(vm.uuid)
            ]
            forward_rows = (
                await session.execute(
                    select(PortForward, Nic, Network)
                    .join(Nic, PortForward.nic_id == Nic.id)
                    .join(Network, PortForward.network_id == Network.id)
                )
            ).tuples()
            forwards = []
            for fwd, nic, net_row in forward_rows:
                ip = self._ip_of(nic)
                if ip is not None:
                    forwards.append(
                        hostnet.PortForward(net_row.name, fwd.proto, fwd.host_port, ip, fwd.vm_port)
                    )
        definitions = [model_of(row) for row in networks]
        if not definitions and not self._firewall_loaded:
            return  # never touch nftables on a host where vmhive has no network
        await self._on_host(hostnet.apply_firewall, definitions, forwards, ports)
        self._firewall_loaded = bool(definitions)

    def _ip_of(self, nic: Nic) -> ipaddress.IPv4Address | None:
        if nic.ip:
            return ipaddress.IPv4Address(nic.ip)
        return self._leases.get(nic.mac)

    async def refresh(self) -> None:
        """Read the leases; when an address appeared or changed, rules follow it."""
        async with self.ctx.sessions() as session:
            rows = list(await session.scalars(select(Network)))
        if not rows:
            return
        before = dict(self._leases)
        await self._read_leases(rows)
        if self._leases != before or not self._firewall_loaded:
            try:
                await self.apply_firewall()
            except JobError as exc:
                log.error("firewall update failed: %s", exc)

    async def plug(self, vm: Vm) -> None:
        """Before QEMU starts: the VM's TAPs, on their bridges, and their rules."""
        if not any(n.backend == "tap" for n in vm.nics):
            return
        for nic in vm.nics:  # a network created through another node is set up here
            if nic.backend == "tap" and nic.network and nic.network.id not in self._set_up:
                log.info("setting up network %s for VM %s", nic.network.name, vm.name)
                await self._set_up_here(nic.network)
        await self._ensure_taps(vm)
        await self.apply_firewall()

    async def unplug(self, vm_uuid: str) -> None:
        """After the VM stopped: its TAPs go, and their rules."""
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None or not any(n.backend == "tap" for n in vm.nics):
            return
        await self._remove_taps(vm)
        try:
            await self.apply_firewall()
        except JobError as exc:
            log.error("firewall update failed: %s", exc)

    async def _ensure_taps(self, vm: Vm) -> None:
        for nic in vm.nics:
            if nic.backend == "tap" and nic.network is not None:
                await self._on_host(
                    hostnet.ensure_tap,
                    hostnet.tap_name(vm.uuid, nic.index),
                    bridge=nic.network.bridge,
                    vlan=nic.vlan,
                    owner=f"vm {vm.name} nic {nic.index}",
                    up=nic.link_up,
                )

    async def _remove_taps(self, vm: Vm) -> None:
        for nic in vm.nics:
            if nic.backend == "tap":
                try:
                    await self._on_host(hostnet.remove_tap, hostnet.tap_name(vm.uuid, nic.index))
                except JobError as exc:
                    log.error("could not remove the TAP of %s NIC %d: %s", vm.name, nic.index, exc)

    async def _reservations(self, network_id: int) -> list[hostnet.DhcpReservation]:
        async with self.ctx.sessions() as session:
            rows = (
                await session.execute(
                    select(Vm.name, Nic)
                    .select_from(Nic)
                    .join(Vm, Nic.vm_id == Vm.id)
                    .where(Nic.network_id == network_id, Nic.ip.is_not(None))
                )
            ).tuples()
            return [
                hostnet.DhcpReservation(nic.mac, ipaddress.IPv4Address(nic.ip), vm_name)
                for vm_name, nic in rows
            ]

    async def update_reservations(self, network_id: int) -> None:
        async with self.ctx.sessions() as session:
            row = await session.get(Network, network_id)
        if row is not None and row.type != "external":
            await self._on_host(
                hostnet.update_reservations,
                model_of(row),
                self.run_dir,
                await self._reservations(network_id),
            )

    # -- NICs ---------------------------------------------------------------------------

    async def resolve_nic(
        self, session: Any, network: str | None, ip: str | None, taken_ips: set[str]
    ) -> tuple[Network | None, str | None]:
        """The network row and a checked reservation address for a new NIC."""
        if network is None:
            if ip is not None:
                raise InvalidRequest("a fixed address (--ip) needs a network")
            return None, None
        row = await session.scalar(select(Network).where(Network.name == network))
        if row is None:
            raise InvalidRequest(f"no network named {network!r} (see `vmhive network list`)")
        if ip is not None:
            ip = check_reservation(row, ip)
            if ip in taken_ips:
                raise Conflict(f"{ip} is already reserved on network {network}")
        return row, ip

    async def add_nic(
        self,
        vm_name: str,
        network: str,
        *,
        mac: str | None = None,
        model: str | None = None,
        ip: str | None = None,
    ) -> str:
        vm = await self.ctx.load_vm(vm_name)
        if len(vm.nics) >= MAX_NICS:
            raise InvalidRequest(f"a VM has at most {MAX_NICS} NICs")
        running = self.ctx.driver.is_running(vm.uuid)
        if running and vm.generation != 2:
            raise Conflict(f"VM {vm_name} is generation 1: stop it to add a NIC")
        qemu_model = check_model(model)
        index = max((n.index for n in vm.nics), default=-1) + 1
        async with self.ctx.sessions() as session:
            taken_macs = set(await session.scalars(select(Nic.mac)))
            taken_ips = set(await session.scalars(select(Nic.ip).where(Nic.ip.is_not(None))))
            row, ip = await self.resolve_nic(session, network, ip, taken_ips)
            assert row is not None
            if mac is not None:
                mac = specs.check_mac(mac)
                if mac in taken_macs:
                    raise Conflict(f"MAC address {mac} is already in use")
            nic = Nic(
                vm_id=vm.id,
                index=index,
                mac=mac or specs.random_mac(taken_macs),
                model=qemu_model,
                backend="tap",
                network_id=row.id,
                ip=ip,
            )
            session.add(nic)
            session.add(
                Event(vm_uuid=vm.uuid, kind="edit", message=f"{vm_name}: NIC {index} added")
            )
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"MAC address {nic.mac} is already in use") from None
            nic_id, network_id = nic.id, row.id
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            async def forget() -> None:
                async with self.ctx.sessions() as session:
                    stale = await session.get(Nic, nic_id)
                    if stale is not None:
                        await session.delete(stale)
                        await session.commit()
                await self.update_reservations(network_id)

            ctx.on_rollback(f"remove NIC {index}", forget)
            if ip is not None:
                await self.update_reservations(network_id)
            fresh = await self.ctx.load_vm_by_uuid(vm_uuid)
            assert fresh is not None
            if self.ctx.driver.is_running(vm_uuid):
                added = next(n for n in fresh.nics if n.id == nic_id)
                await self._ensure_taps(fresh)
                ctx.on_rollback("remove its TAP", lambda: self._remove_taps(fresh))
                await self.apply_firewall()
                await ctx.log(f"hot-plugging NIC {index} on network {network}")
                try:
                    await self.ctx.driver.hotplug_nic(vm_uuid, index, nic_spec(fresh, added))
                except DriverError as exc:
                    raise JobError(str(exc)) from exc
            mac_of = next(n.mac for n in fresh.nics if n.id == nic_id)
            return {"vm": vm_name, "nic": index, "mac": mac_of, "network": network}

        return await self.ctx.runner.submit(
            "vm.nic-add", f"vm:{vm_uuid}", job, params={"name": vm_name}
        )

    async def remove_nic(self, vm_name: str, index: int) -> str:
        vm = await self.ctx.load_vm(vm_name)
        nic = next((n for n in vm.nics if n.index == index), None)
        if nic is None:
            raise NotFound(f"VM {vm_name} has no NIC {index}")
        running = self.ctx.driver.is_running(vm.uuid)
        if running and vm.generation != 2:
            raise Conflict(f"VM {vm_name} is generation 1: stop it to remove a NIC")
        vm_uuid, nic_id, network_id, tap = vm.uuid, nic.id, nic.network_id, nic.backend == "tap"

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.ctx.driver.is_running(vm_uuid):
                await ctx.log(f"asking the guest to release NIC {index}")
                try:
                    await self.ctx.driver.unplug_nic(vm_uuid, index)
                except DriverError as exc:
                    raise JobError(str(exc)) from exc
            ctx.commit()
            if tap:
                await self._on_host(hostnet.remove_tap, hostnet.tap_name(vm_uuid, index))
            async with self.ctx.sessions() as session:
                stale = await session.get(Nic, nic_id)
                if stale is not None:
                    await session.delete(stale)  # its port forwards go with it
                    session.add(
                        Event(
                            vm_uuid=vm_uuid, kind="edit", message=f"{vm_name}: NIC {index} removed"
                        )
                    )
                    await session.commit()
            if network_id is not None:
                await self.update_reservations(network_id)
                await self.apply_firewall()
            return {"vm": vm_name, "nic": index}

        return await self.ctx.runner.submit(
            "vm.nic-remove", f"vm:{vm_uuid}", job, params={"name": vm_name}
        )

    async def set_link(self, vm_name: str, index: int, up: bool) -> str:
        vm = await self.ctx.load_vm(vm_name)
        nic = next((n for n in vm.nics if n.index == index), None)
        if nic is None:
            raise NotFound(f"VM {vm_name} has no NIC {index}")
        vm_uuid, nic_id = vm.uuid, nic.id

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.ctx.driver.is_running(vm_uuid):
                try:
                    await self.ctx.driver.set_nic_link(vm_uuid, index, up)
                except DriverError as exc:
                    raise JobError(str(exc)) from exc
            async with self.ctx.sessions() as session:
                row = await session.get(Nic, nic_id)
                if row is not None:
                    row.link_up = up
                    await session.commit()
            await ctx.log(f"NIC {index}: link {'up' if up else 'down'}")
            return {"vm": vm_name, "nic": index, "link_up": up}

        return await self.ctx.runner.submit(
            "vm.nic-link", f"vm:{vm_uuid}", job, params={"name": vm_name}
        )

    # -- port forwards -------------------------------------------------------------------

    async def add_forward(
        self,
        network: str,
        *,
        host_port: int,
        vm_name: str,
        vm_port: int,
        proto: str = "tcp",
        nic: int | None = None,
    ) -> dict[str, Any]:
        if proto not in ("tcp", "udp"):
            raise InvalidRequest(f"protocol must be tcp or udp, got {proto!r}")
        for port, what in ((host_port, "host port"), (vm_port, "VM port")):
            if not 1 <= port <= 65535:
                raise InvalidRequest(f"{what} must be between 1 and 65535, got {port}")
        row = await self.get(network)
        if row.type != "nat":
            raise InvalidRequest(f"port forwards need a nat network; {network} is {row.type}")
        vm = await self.ctx.load_vm(vm_name)
        candidates = [
            n for n in vm.nics if n.network_id == row.id and (nic is None or n.index == nic)
        ]
        if not candidates:
            raise InvalidRequest(f"VM {vm_name} has no NIC on network {network}")
        async with self.ctx.sessions() as session:
            session.add(
                PortForward(
                    network_id=row.id,
                    nic_id=candidates[0].id,
                    proto=proto,
                    host_port=host_port,
                    vm_port=vm_port,
                )
            )
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"host port {proto}/{host_port} is already forwarded") from None
        try:
            await self.apply_firewall()
        except JobError as exc:
            await self.remove_forward(network, host_port, proto, apply=False)
            raise InvalidRequest(str(exc)) from None
        return {
            "network": network,
            "proto": proto,
            "host_port": host_port,
            "vm": vm_name,
            "vm_port": vm_port,
        }

    async def list_forwards(self, network: str) -> list[dict[str, Any]]:
        row = await self.get(network)
        async with self.ctx.sessions() as session:
            rows = (
                await session.execute(
                    select(PortForward, Nic, Vm.name)
                    .join(Nic, PortForward.nic_id == Nic.id)
                    .join(Vm, Nic.vm_id == Vm.id)
                    .where(PortForward.network_id == row.id)
                    .order_by(PortForward.proto, PortForward.host_port)
                )
            ).tuples()
            return [
                {
                    "proto": fwd.proto,
                    "host_port": fwd.host_port,
                    "vm": vm_name,
                    "nic": nic.index,
                    "vm_port": fwd.vm_port,
                    "vm_ip": self.cached_address(nic),
                }
                for fwd, nic, vm_name in rows
            ]

    async def remove_forward(
        self, network: str, host_port: int, proto: str = "tcp", *, apply: bool = True
    ) -> None:
        row = await self.get(network)
        async with self.ctx.sessions() as session:
            fwd = await session.scalar(
                select(PortForward).where(
                    PortForward.network_id == row.id,
                    PortForward.proto == proto,
                    PortForward.host_port == host_port,
                )
            )
            if fwd is None:
                raise NotFound(f"no forward of {proto}/{host_port} on network {network}")
            await session.delete(fwd)
            await session.commit()
        if apply:
            await self.apply_firewall()

    # -- leftovers -----------------------------------------------------------------------

    async def cleanup(self, dry_run: bool) -> dict[str, list[str]]:
        """Everything vmhive-named on the host that nothing in the database owns."""
        async with self.ctx.sessions() as session:
            networks = list(await session.scalars(select(Network)))
            vms = list(await session.scalars(select(Vm)))
        bridges = {n.bridge for n in networks}
        taps = {
            hostnet.tap_name(vm.uuid, nic.index)
            for vm in vms
            if self.ctx.driver.is_running(vm.uuid)
            for nic in vm.nics
            if nic.backend == "tap"
        }
        inventory = await asyncio.to_thread(hostnet.scan_host, self.run_dir)
        stray = {
            "bridges": [link.name for link in inventory.bridges if link.name not in bridges],
            "taps": [link.name for link in inventory.taps if link.name not in taps],
            "links": [link.name for link in inventory.other_links],
            "nft_tables": list(inventory.nft_tables) if not networks else [],
            "dnsmasq": [
                str(d.pid)
                for d in inventory.dnsmasq
                if d.pid is not None and d.network not in {n.name for n in networks}
            ],
        }
        if not dry_run:
            for name in stray["bridges"] + stray["taps"] + stray["links"]:
                await self._on_host(hostnet.remove_link, name)
            if stray["nft_tables"]:
                await self._on_host(hostnet.remove_firewall)
            for instance in inventory.dnsmasq:
                if str(instance.pid) in stray["dnsmasq"]:
                    await self._on_host(stop_dnsmasq, instance.paths)
        return stray


def check_model(model: str | None) -> str | None:
    if model is None:
        return None
    if model not in NIC_MODELS:
        raise InvalidRequest(f"NIC model must be one of {', '.join(NIC_MODELS)}, got {model!r}")
    return NIC_MODELS[model]


def check_reservation(row: Network, ip: str) -> str:
    """A fixed address must lie in the network's subnet and not be its gateway."""
    if row.type == "external" or not row.subnet:
        raise InvalidRequest(f"network {row.name} has no DHCP server to reserve {ip} on")
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        raise InvalidRequest(f"{ip!r} is not an IPv4 address") from None
    subnet = ipaddress.IPv4Network(row.subnet)
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
        raise InvalidRequest(f"{ip} is not a host address of {row.name} ({subnet})")
    if row.gateway and address == ipaddress.IPv4Address(row.gateway):
        raise InvalidRequest(f"{ip} is the gateway of {row.name}")
    return str(address)
