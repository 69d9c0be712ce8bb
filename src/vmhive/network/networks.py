"""Bringing a whole network up on this host, and taking it down again.

`ensure_network` makes the host match a `Network`: bridge, host address,
forwarding, uplink and dnsmasq. It is idempotent (a second call with the same
network changes nothing and keeps the running dnsmasq) and all-or-nothing (a
failure undoes what the call did). The firewall covers all networks at once
and is applied separately (`vmhive.network.firewall.apply_firewall`) after the
set of networks, forwards or VM ports changed.

Each network's dnsmasq keeps its files in ``<run_dir>/<network name>/``. The
directory and its parents must be searchable by the unprivileged user dnsmasq
runs as, since it re-reads reservations after dropping privileges.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmhive.network import links
from vmhive.network.dnsmasq import (
    DNSMASQ,
    NetnsSetup,
    check_readable_by,
    dnsmasq_user,
    find_dnsmasq,
    read_leases,
    reload_dnsmasq,
    start_dnsmasq,
    stop_dnsmasq,
    write_if_changed,
)
from vmhive.network.dnsmasq_config import (
    PRIVATE_DHCP_IFNAME,
    DnsmasqPaths,
    render_config,
    render_hostsfile,
)
from vmhive.network.errors import LinkConflictError, LinkError, NetworkConfigError
from vmhive.network.model import (
    ROUTED_TYPES,
    DhcpReservation,
    Lease,
    Network,
    NetworkType,
    validate_network,
)
from vmhive.network.names import dhcp_veth_name
from vmhive.network.rollback import Rollback
from vmhive.network.subnets import check_subnet, host_used_networks


@dataclass(frozen=True)
class NetworkState:
    """What `ensure_network` left running: the bridge VMs attach to, and dnsmasq's PID."""

    bridge: str
    dnsmasq_pid: int | None


def network_alias(net: Network) -> str:
    """The label vmhive puts on a network's bridge (``ip link`` shows it as its alias)."""
    return f"vmhive network {net.name}"


def dnsmasq_paths(net: Network, run_dir: Path) -> DnsmasqPaths:
    return DnsmasqPaths(Path(run_dir).absolute() / net.name)


def ensure_network(
    net: Network,
    run_dir: Path,
    *,
    reservations: Iterable[DhcpReservation] | None = None,
    dnsmasq: str = DNSMASQ,
) -> NetworkState:
    """Make the host provide `net`; see the module docstring.

    `reservations` replaces the network's static DHCP leases (dnsmasq re-reads
    them without a restart); None keeps the current ones. A nat or internal
    subnet that overlaps a host route or address (other than the network's own
    bridge) raises `SubnetConflictError`; overlaps with other vmhive networks,
    private ones included (they have no host route), are the caller's to check
    (`check_subnet` with their subnets as `UsedNetwork`s).
    """
    validate_network(net)
    dhcp = _DhcpFiles.render(net, dnsmasq_paths(net, run_dir), reservations)
    with Rollback() as rollback:
        if not net.owns_bridge:
            existing = links.get_link(net.bridge)
            if existing is None or existing.kind != "bridge":
                raise LinkError(f"network {net.name}: host bridge {net.bridge} does not exist")
            return NetworkState(net.bridge, None)

        if net.type in (NetworkType.NAT, NetworkType.INTERNAL):
            assert net.subnet is not None
            check_subnet(net.subnet, host_used_networks(ignore_links=(net.bridge,)))
        if links.ensure_bridge(net.bridge, alias=network_alias(net)):
            rollback.add(f"delete bridge {net.bridge}", lambda: links.remove_link(net.bridge))

        host_on_bridge = net.type in (NetworkType.NAT, NetworkType.INTERNAL)
        added, removed = links.set_ipv4_addresses(
            net.bridge, [net.gateway_interface] if host_on_bridge else []
        )
        if added or removed:
            rollback.add(
                f"restore the addresses of {net.bridge}",
                lambda: links.set_ipv4_addresses(net.bridge, removed),
            )
        if not host_on_bridge:
            links.ignore_arp(net.bridge)  # the host is not on this network: not even for ARP
        if net.type == NetworkType.NAT:
            links.enable_ip_forwarding()
        if net.uplink is not None and links.enslave_uplink(net.uplink, net.bridge):
            rollback.add(
                f"release {net.uplink}", lambda: links.release_uplink(net.uplink or "", net.bridge)
            )
        links.set_link_up(net.bridge)

        pid = _ensure_dnsmasq(net, dhcp, dnsmasq, rollback) if dhcp is not None else None
        return NetworkState(net.bridge, pid)


@dataclass(frozen=True)
class _DhcpFiles:
    """A network's dnsmasq files, rendered before the host is touched (bad input fails early)."""

    paths: DnsmasqPaths
    user: str
    config: str
    hosts: str | None  # None: keep the current reservations

    @classmethod
    def render(
        cls, net: Network, paths: DnsmasqPaths, reservations: Iterable[DhcpReservation] | None
    ) -> _DhcpFiles | None:
        if net.type not in ROUTED_TYPES:
            return None
        user, group = dnsmasq_user()
        hosts = render_hostsfile(net, reservations) if reservations is not None else None
        return cls(paths, user, render_config(net, paths, user=user, group=group), hosts)


def _ensure_dnsmasq(net: Network, dhcp: _DhcpFiles, binary: str, rollback: Rollback) -> int:
    paths = dhcp.paths
    if not paths.directory.exists():
        paths.directory.mkdir(parents=True, mode=0o755)
        rollback.add(
            f"remove {paths.directory}", lambda: shutil.rmtree(paths.directory, ignore_errors=True)
        )
    check_readable_by(paths, dhcp.user)
    conf_changed = write_if_changed(paths.conf, dhcp.config)
    if dhcp.hosts is not None:
        hosts_changed = write_if_changed(paths.hostsfile, dhcp.hosts)
    else:
        hosts_changed = not paths.hostsfile.exists() and write_if_changed(paths.hostsfile, "")

    pid = find_dnsmasq(paths, binary)
    if pid is not None and (conf_changed or not _dnsmasq_plumbed(net)):
        stop_dnsmasq(paths, binary=binary)
        pid = None
    if pid is not None:
        if hosts_changed:
            reload_dnsmasq(paths, binary=binary)
        return pid

    netns = None
    if net.type == NetworkType.PRIVATE:
        veth = dhcp_veth_name(net.bridge)
        links.remove_link(veth)  # left over from a dnsmasq that died
        links.wait_link_absent(veth)
        netns = NetnsSetup(
            ifname=PRIVATE_DHCP_IFNAME,
            address=net.gateway_interface,
            prepare=lambda pid: links.create_veth_into(
                veth, PRIVATE_DHCP_IFNAME, pid, bridge=net.bridge
            ),
        )
        rollback.add(f"delete veth {veth}", lambda: links.remove_link(veth))
    pid = start_dnsmasq(paths, binary=binary, netns=netns)
    rollback.add(f"stop dnsmasq {pid}", lambda: stop_dnsmasq(paths, binary=binary))
    return pid


def _dnsmasq_plumbed(net: Network) -> bool:
    """A private network's dnsmasq is only useful while its veth is a port of the bridge."""
    if net.type != NetworkType.PRIVATE:
        return True
    veth = links.get_link(dhcp_veth_name(net.bridge))
    return veth is not None and veth.master == net.bridge


def remove_network(net: Network, run_dir: Path, *, dnsmasq: str = DNSMASQ) -> None:
    """Take `net` off the host: dnsmasq, its files, the uplink, the bridge (idempotent).

    TAPs still attached to the bridge are detached, not deleted. An existing host
    bridge (external network without uplink) is left alone.
    """
    validate_network(net)
    if not net.owns_bridge:
        return
    paths = dnsmasq_paths(net, run_dir)
    if net.type in ROUTED_TYPES:
        stop_dnsmasq(paths, binary=dnsmasq)
    if net.type == NetworkType.PRIVATE:
        links.remove_link(dhcp_veth_name(net.bridge))
    bridge = links.get_link(net.bridge)
    if bridge is not None:
        if bridge.kind != "bridge" or bridge.alias not in (None, network_alias(net)):
            raise LinkConflictError(
                f"network {net.name}: {net.bridge} is not its bridge "
                f"({bridge.kind or 'NIC'}, {bridge.alias or 'no owner'})"
            )
        if net.uplink is not None:
            links.release_uplink(net.uplink, net.bridge)
        links.remove_link(net.bridge)
    if net.type in ROUTED_TYPES and paths.directory.is_dir():
        for path in (
            paths.conf,
            paths.hostsfile,
            paths.leases,
            paths.pidfile,
            paths.log,
            paths.stderr,
        ):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            paths.directory.rmdir()


def update_reservations(
    net: Network,
    run_dir: Path,
    reservations: Iterable[DhcpReservation],
    *,
    dnsmasq: str = DNSMASQ,
) -> bool:
    """Replace the static DHCP leases of `net`; its dnsmasq re-reads them (SIGHUP).

    Returns whether anything changed. The network must have been ensured; if its
    dnsmasq is not running, the next `ensure_network` starts it with these.
    """
    validate_network(net)
    if net.type not in ROUTED_TYPES:
        raise NetworkConfigError(f"network {net.name} ({net.type}) has no DHCP server")
    paths = dnsmasq_paths(net, run_dir)
    if not paths.directory.is_dir():
        raise NetworkConfigError(f"network {net.name} is not set up on this host")
    changed = write_if_changed(paths.hostsfile, render_hostsfile(net, reservations))
    if changed and find_dnsmasq(paths, dnsmasq) is not None:
        reload_dnsmasq(paths, binary=dnsmasq)
    return changed


def network_leases(net: Network, run_dir: Path) -> dict[str, Lease]:
    """The current DHCP leases of `net`, by MAC."""
    if net.type not in ROUTED_TYPES:
        return {}
    return read_leases(dnsmasq_paths(net, run_dir))
