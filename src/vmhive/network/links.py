"""Bridges, TAP devices, veths and their addresses, through netlink (pyroute2).

Every ``ensure_*`` function succeeds when the device is already as asked, and
every ``remove_*`` function when it is already gone. Functions that make
several changes undo their own changes when a later step fails.

The functions are blocking (pyroute2's synchronous API runs an event loop of
its own): from asyncio code, call them through ``asyncio.to_thread``.

Per-interface kernel settings (``ip_forward``, ``route_localnet``,
``disable_ipv6``) go through ``/proc/sys``, which shows the settings of the
calling process's network namespace.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmhive.network.errors import LinkConflictError, LinkError, NetworkConfigError
from vmhive.network.names import (
    BRIDGE_PREFIX,
    DHCP_VETH_PREFIX,
    TAP_PREFIX,
    check_ifname,
    is_vmhive_ifname,
)

PROC_SYS: Final = Path("/proc/sys")
_IFF_UP: Final = 0x1
_TUN_TYPE_TAP: Final = 2
_VLAN_PVID: Final = 0x2
_VLAN_UNTAGGED: Final = 0x4
_DEFAULT_PVID: Final = 1
MAX_VLAN: Final = 4094


@dataclass(frozen=True)
class LinkInfo:
    """What vmhive needs to know about one network device."""

    name: str
    index: int
    kind: str | None  # "bridge", "tun", "veth", ...; None for a plain NIC
    is_tap: bool
    master: str | None
    up: bool  # administratively up
    alias: str | None
    ipv4: tuple[IPv4Interface, ...]
    vlan_filtering: bool = False  # bridges only


@contextmanager
def _netlink(action: str) -> Iterator[IPRoute]:
    """An IPRoute socket; netlink and ioctl errors become a one-line `LinkError`."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise LinkError(f"{action}: {_strerror(exc)}") from None
    except OSError as exc:
        raise LinkError(f"{action}: {exc.strerror or exc}") from None


def _strerror(exc: NetlinkError) -> str:
    code = exc.code
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _info_data(msg: Any) -> Any:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    return linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo is not None else None


def _to_info(msg: Any, names: dict[int, str], addrs: dict[int, list[IPv4Interface]]) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    data = _info_data(msg)
    is_tap = kind == "tun" and data is not None and data.get_attr("IFLA_TUN_TYPE") == _TUN_TYPE_TAP
    vlan_filtering = (
        kind == "bridge" and data is not None and bool(data.get_attr("IFLA_BR_VLAN_FILTERING"))
    )
    master = msg.get_attr("IFLA_MASTER")
    return LinkInfo(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        is_tap=is_tap,
        master=names.get(master) if master else None,
        up=bool(msg["flags"] & _IFF_UP),
        alias=msg.get_attr("IFLA_IFALIAS") or None,
        ipv4=tuple(addrs.get(msg["index"], ())),
        vlan_filtering=vlan_filtering,
    )


def _read_links(ipr: IPRoute) -> list[LinkInfo]:
    msgs = list(ipr.get_links())
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
    addrs: dict[int, list[IPv4Interface]] = {}
    for addr in ipr.get_addr(family=2):
        iface = IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
        addrs.setdefault(addr["index"], []).append(iface)
    return [_to_info(m, names, addrs) for m in msgs]


def list_links() -> list[LinkInfo]:
    """Every network device of this namespace."""
    with _netlink("cannot list network devices") as ipr:
        return _read_links(ipr)


def get_link(name: str) -> LinkInfo | None:
    """The device called `name`, or None."""
    with _netlink(f"cannot read device {name}") as ipr:
        for link in _read_links(ipr):
            if link.name == name:
                return link
    return None


def _has_global_ipv6(ipr: IPRoute, index: int) -> bool:
    # RT_SCOPE_UNIVERSE (0): not link-local
    return any(addr["scope"] == 0 for addr in ipr.get_addr(family=10, index=index))


# ---------------------------------------------------------------------------
# /proc/sys


def write_sysctl(key: str, value: str) -> None:
    """Set ``/proc/sys/<key>`` (e.g. ``net/ipv4/ip_forward``) unless it already holds `value`."""
    path = PROC_SYS / key
    try:
        if path.read_text().strip() == value:
            return
        path.write_text(value + "\n")
    except OSError as exc:
        raise LinkError(f"cannot set {key.replace('/', '.')} to {value}: {exc.strerror}") from None


def enable_ip_forwarding() -> None:
    """Turn on IPv4 forwarding for this namespace (needed by nat networks; never turned off)."""
    write_sysctl("net/ipv4/ip_forward", "1")


def set_route_localnet(ifname: str, enabled: bool) -> None:
    """Allow 127.0.0.0/8 sources to be routed out of `ifname` (port forwards from localhost)."""
    write_sysctl(f"net/ipv4/conf/{check_ifname(ifname)}/route_localnet", "1" if enabled else "0")


def ignore_arp(ifname: str) -> None:
    """Never answer ARP requests arriving on `ifname` (arp_ignore 8), whatever they ask for."""
    write_sysctl(f"net/ipv4/conf/{check_ifname(ifname)}/arp_ignore", "8")


def disable_ipv6(ifname: str) -> None:
    """No IPv6 (hence no link-local address) on `ifname`; a no-op on hosts without IPv6."""
    if (PROC_SYS / "net/ipv6/conf" / check_ifname(ifname)).is_dir():
        write_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")


# ---------------------------------------------------------------------------
# generic devices


def remove_link(name: str) -> bool:
    """Delete the device `name`; False if there was none."""
    check_ifname(name)
    with _netlink(f"cannot delete device {name}") as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False  # it went away by itself meanwhile
            raise
    return True


def wait_link_absent(name: str, timeout: float = 5.0) -> None:
    """Wait until the device `name` is gone (a veth whose peer's namespace is being torn down)."""
    deadline = time.monotonic() + timeout
    with _netlink(f"cannot read device {name}") as ipr:
        while _lookup(ipr, name) is not None:
            if time.monotonic() >= deadline:
                raise LinkError(f"device {name} is still present after {timeout:.0f} s")
            time.sleep(0.02)


def set_link_up(name: str, up: bool = True) -> None:
    """Bring `name` administratively up (or down)."""
    with _netlink(f"cannot set {name} {'up' if up else 'down'}") as ipr:
        index = _lookup(ipr, check_ifname(name))
        if index is None:
            raise LinkError(f"cannot set {name} {'up' if up else 'down'}: no such device")
        ipr.link("set", index=index, state="up" if up else "down")


def set_ipv4_addresses(
    name: str, wanted: Sequence[IPv4Interface]
) -> tuple[list[IPv4Interface], list[IPv4Interface]]:
    """Make `wanted` the only IPv4 addresses of `name`; return (added, removed)."""
    added: list[IPv4Interface] = []
    removed: list[IPv4Interface] = []
    with _netlink(f"cannot set the addresses of {name}") as ipr:
        index = _lookup(ipr, name)
        if index is None:
            raise LinkError(f"cannot set the addresses of {name}: no such device")
        current = [
            IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=2, index=index)
        ]
        for iface in current:
            if iface not in wanted:
                ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
                removed.append(iface)
        for iface in wanted:
            if iface not in current:
                ipr.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
                added.append(iface)
    return added, removed


def bridge_mac(name: str) -> str:
    """The MAC of vmhive's bridge `name`: locally administered unicast (02:...) and
    derived from the name, so every node of a cluster gives a network's gateway
    the same MAC and a guest migrated between them keeps a valid ARP entry.

    >>> bridge_mac("vh-bexample")
    '02:d0:94:eb:8f:23'
    """
    tail = hashlib.sha256(name.encode()).digest()[:5]
    return "02:" + ":".join(f"{b:02x}" for b in tail)


# ---------------------------------------------------------------------------
# bridges


def ensure_bridge(name: str, *, alias: str) -> bool:
    """Create the bridge `name` labelled `alias` (its owner) unless it exists; True if created.

    An existing bridge with another owner's label is refused. Bridges get the fixed
    MAC `bridge_mac(name)` (a bridge otherwise takes the lowest MAC of its ports,
    which changes as VMs come and go; an existing one is given it), forward delay
    0 and no IPv6.
    """
    check_ifname(name)
    with _netlink(f"cannot create bridge {name}") as ipr:
        index = _lookup(ipr, name)
        if index is not None:
            existing = _to_info(ipr.get_links(index)[0], {}, {})
            if existing.kind != "bridge":
                raise LinkConflictError(
                    f"device {name} exists and is a {existing.kind or 'NIC'}, not a bridge"
                )
            if existing.alias not in (None, alias):
                raise LinkConflictError(
                    f"bridge {name} exists and belongs to {existing.alias!r}, not {alias!r}"
                )
            if existing.alias is None:
                ipr.link("set", index=index, ifalias=alias)
            if ipr.get_links(index)[0].get_attr("IFLA_ADDRESS") != bridge_mac(name):
                ipr.link("set", index=index, address=bridge_mac(name))
            created = False
        else:
            ipr.link(
                "add", ifname=name, kind="bridge", address=bridge_mac(name), br_forward_delay=0
            )
            created = True
            try:
                index = _lookup(ipr, name)
                ipr.link("set", index=index, ifalias=alias)
            except NetlinkError:
                ipr.link("del", ifname=name)
                raise
    try:
        disable_ipv6(name)
    except LinkError:
        if created:
            remove_link(name)
        raise
    return created


def attach_to_bridge(ifname: str, bridge: str, *, vlan: int | None = None) -> None:
    """Make `ifname` a port of `bridge` (moving it from another bridge if needed).

    With `vlan`, the port becomes an access port of that VLAN (PVID, untagged) on
    a VLAN-filtering bridge; on a vmhive bridge the VLAN is also allowed, tagged,
    on the uplink ports (the ports that are neither TAPs nor DHCP veths).
    """
    check_ifname(ifname)
    check_ifname(bridge, "bridge")
    if vlan is not None and (
        not isinstance(vlan, int) or isinstance(vlan, bool) or not 1 <= vlan <= MAX_VLAN
    ):
        raise NetworkConfigError(f"VLAN of {ifname} must be between 1 and {MAX_VLAN}, got {vlan!r}")
    with _netlink(f"cannot attach {ifname} to bridge {bridge}") as ipr:
        links = {link.name: link for link in _read_links(ipr)}
        port, br = links.get(ifname), links.get(bridge)
        if port is None:
            raise LinkError(f"cannot attach {ifname} to bridge {bridge}: no device {ifname}")
        if br is None or br.kind != "bridge":
            raise LinkError(f"cannot attach {ifname} to bridge {bridge}: no such bridge")
        moved = port.master != bridge
        if moved:
            ipr.link("set", index=port.index, master=br.index)
        if vlan is not None or br.vlan_filtering:
            try:
                _configure_access_vlan(ipr, links, br, port, vlan)
            except Exception:
                if moved:
                    previous = links.get(port.master) if port.master else None
                    ipr.link("set", index=port.index, master=previous.index if previous else 0)
                raise


# ---------------------------------------------------------------------------
# VLANs on bridge ports


def _port_vlans(ipr: IPRoute, index: int) -> dict[int, int]:
    """VLAN id -> flags of the bridge port `index`."""
    vlans: dict[int, int] = {}
    for msg in ipr.get_vlans(index=index):
        spec = msg.get_attr("IFLA_AF_SPEC")
        if spec is None:
            continue
        for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
            vlans[info["vid"]] = info["flags"]
    return vlans


def _configure_access_vlan(
    ipr: IPRoute, links: dict[str, LinkInfo], br: LinkInfo, port: LinkInfo, vlan: int | None
) -> None:
    if not br.vlan_filtering:
        try:
            ipr.link("set", index=br.index, kind="bridge", br_vlan_filtering=1)
        except NetlinkError as exc:
            raise LinkError(
                f"cannot enable VLAN filtering on bridge {br.name}: {_strerror(exc)} "
                "(does the kernel have CONFIG_BRIDGE_VLAN_FILTERING?)"
            ) from None
    vid = vlan if vlan is not None else _DEFAULT_PVID
    for other in _port_vlans(ipr, port.index):
        if other != vid:
            ipr.vlan_filter("del", index=port.index, vlan_info={"vid": other})
    ipr.vlan_filter(
        "add", index=port.index, vlan_info={"vid": vid, "flags": _VLAN_PVID | _VLAN_UNTAGGED}
    )
    if br.name.startswith(BRIDGE_PREFIX) and vid != _DEFAULT_PVID:
        for uplink in _uplinks(links, br.name):
            if vid not in _port_vlans(ipr, uplink.index):
                ipr.vlan_filter("add", index=uplink.index, vlan_info={"vid": vid})


def _uplinks(links: dict[str, LinkInfo], bridge: str) -> list[LinkInfo]:
    return [
        link
        for link in links.values()
        if link.master == bridge and not link.name.startswith((TAP_PREFIX, DHCP_VETH_PREFIX))
    ]


def _prune_uplink_vlans(ipr: IPRoute, bridge: str) -> None:
    """Stop carrying VLANs on a vmhive bridge's uplinks that no TAP uses any more."""
    links = {link.name: link for link in _read_links(ipr)}
    br = links.get(bridge)
    if br is None or not br.vlan_filtering or not bridge.startswith(BRIDGE_PREFIX):
        return
    in_use = {_DEFAULT_PVID}
    for link in links.values():
        if link.master == bridge and link.name.startswith(TAP_PREFIX):
            in_use.update(_port_vlans(ipr, link.index))
    for uplink in _uplinks(links, bridge):
        for vid in _port_vlans(ipr, uplink.index):
            if vid not in in_use:
                ipr.vlan_filter("del", index=uplink.index, vlan_info={"vid": vid})


# ---------------------------------------------------------------------------
# TAP devices


def ensure_tap(
    name: str,
    *,
    bridge: str,
    vlan: int | None = None,
    owner: str | None = None,
    up: bool = True,
) -> bool:
    """A persistent TAP `name` (owned by root), attached to `bridge`, up; True if created.

    QEMU opens it by name (``-netdev tap,ifname=NAME,script=no,downscript=no``).
    If a later step fails, a TAP created by this call is deleted again.
    """
    check_ifname(name, "TAP name")
    if not name.startswith(TAP_PREFIX):
        raise NetworkConfigError(f"TAP name {name} must start with {TAP_PREFIX}")
    created = False
    with _netlink(f"cannot create TAP {name}") as ipr:
        index = _lookup(ipr, name)
        if index is not None:
            existing = _to_info(ipr.get_links(index)[0], {}, {})
            if not existing.is_tap:
                raise LinkConflictError(f"device {name} exists and is not a TAP")
        else:
            ipr.link(
                "add",
                ifname=name,
                kind="tuntap",
                mode="tap",
                uid=0,
                gid=0,
                ifr={"no_pi": True, "one_queue": False, "vnet_hdr": True, "multi_queue": False},
            )
            created = True
    try:
        disable_ipv6(name)
        with _netlink(f"cannot configure TAP {name}") as ipr:
            index = _lookup(ipr, name)
            if owner is not None:
                ipr.link("set", index=index, ifalias=f"vmhive {owner}")
        attach_to_bridge(name, bridge, vlan=vlan)
        set_link_up(name, up)
    except Exception:
        if created:
            remove_link(name)
        raise
    return created


def remove_tap(name: str) -> bool:
    """Delete the TAP `name` (and VLANs its bridge's uplinks carried only for it)."""
    check_ifname(name, "TAP name")
    if not name.startswith(TAP_PREFIX):
        raise NetworkConfigError(f"TAP name {name} must start with {TAP_PREFIX}")
    link = get_link(name)
    if link is None:
        return False
    removed = remove_link(name)
    if link.master is not None:
        with _netlink(f"cannot update the VLANs of bridge {link.master}") as ipr:
            _prune_uplink_vlans(ipr, link.master)
    return removed


# ---------------------------------------------------------------------------
# uplinks and veths


def enslave_uplink(nic: str, bridge: str) -> bool:
    """Make the host NIC `nic` a port of the vmhive `bridge`; True if this call did it.

    The NIC's addresses are never touched: a NIC with an IPv4 or global IPv6
    address is refused (a bridge port no longer receives for its own addresses,
    so the host would lose them), as is a NIC that is another bridge's port.
    """
    check_ifname(nic, "uplink")
    with _netlink(f"cannot use {nic} as the uplink of {bridge}") as ipr:
        links = {link.name: link for link in _read_links(ipr)}
        port = links.get(nic)
        br = links.get(bridge)
        if port is None:
            raise LinkError(f"cannot use {nic} as the uplink of {bridge}: no such device")
        if br is None or br.kind != "bridge":
            raise LinkError(f"cannot use {nic} as the uplink of {bridge}: no such bridge")
        if port.master == bridge:
            if not port.up:
                ipr.link("set", index=port.index, state="up")
            return False
        if port.master is not None:
            raise LinkConflictError(f"{nic} is already a port of {port.master}")
        if port.kind == "bridge" or is_vmhive_ifname(nic):
            raise LinkConflictError(f"{nic} is not a host NIC")
        if port.ipv4 or _has_global_ipv6(ipr, port.index):
            raise LinkConflictError(
                f"{nic} has addresses of its own; move them to a host bridge and use that "
                "bridge for the external network instead"
            )
        ipr.link("set", index=port.index, master=br.index)
        try:
            ipr.link("set", index=port.index, state="up")
        except NetlinkError:
            ipr.link("set", index=port.index, master=0)
            raise
    return True


def release_uplink(nic: str, bridge: str) -> None:
    """Take `nic` out of `bridge` if it is a port of it (its link state is left as is)."""
    with _netlink(f"cannot release {nic} from {bridge}") as ipr:
        index, bridge_index = _lookup(ipr, nic), _lookup(ipr, bridge)
        if index is None or bridge_index is None:
            return
        if ipr.get_links(index)[0].get_attr("IFLA_MASTER") == bridge_index:
            ipr.link("set", index=index, master=0)


def create_veth_into(host_end: str, peer: str, pid: int, *, bridge: str) -> None:
    """A veth whose end `host_end` is a port of `bridge` and whose end `peer` is in the
    network namespace of process `pid`. Partially created devices are removed on failure.
    """
    check_ifname(host_end)
    check_ifname(peer)
    with _netlink(f"cannot create veth {host_end}") as ipr:
        ipr.link("add", ifname=host_end, kind="veth", peer={"ifname": peer, "net_ns_pid": pid})
    try:
        disable_ipv6(host_end)
        attach_to_bridge(host_end, bridge)
        set_link_up(host_end)
    except Exception:
        remove_link(host_end)
        raise
