"""Plain data describing networks, port forwards, VM ports and DHCP leases.

Everything here is immutable and free of I/O. `define_network` fills the
defaults of a network (bridge name, gateway, DHCP range) and validates it; the
other modules take these objects as they are.

The four network types:

* ``nat``: a bridge with the host's gateway address, DHCP and DNS, and the
  subnet masqueraded towards everything outside it (libvirt's ``virbr0``, the
  Hyper-V Default Switch);
* ``internal``: a bridge with a host address and DHCP/DNS; nothing is
  forwarded beyond it (host and VMs only);
* ``private``: VMs only; the host has no address on the bridge and no route to
  it. DHCP is served from a network namespace of its own (see `vmhive.network`);
* ``external``: VMs on a host LAN, either through a host NIC that vmhive
  enslaves to a bridge of its own (``uplink``), or through an existing host
  bridge (``bridge``). vmhive never changes the host NIC's addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address, ip_network
from typing import Final

from vmhive.network.errors import NetworkConfigError
from vmhive.network.names import (
    BRIDGE_PREFIX,
    bridge_name,
    check_ifname,
    check_network_name,
    is_vmhive_ifname,
)

MAC_RE: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DNS_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME_RE: Final = re.compile(rf"^{_DNS_LABEL}$", re.IGNORECASE)
DOMAIN_RE: Final = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
#: Prefix lengths a network's subnet may have: /29 still leaves a gateway and five VMs.
MIN_PREFIXLEN: Final = 8
MAX_PREFIXLEN: Final = 29
#: dnsmasq refuses leases shorter than two minutes.
MIN_LEASE_SECONDS: Final = 120
PROTOCOLS: Final = frozenset({"tcp", "udp"})


class NetworkType(StrEnum):
    NAT = "nat"
    INTERNAL = "internal"
    PRIVATE = "private"
    EXTERNAL = "external"


#: Types whose bridge, DHCP server and subnet vmhive runs itself.
ROUTED_TYPES: Final = frozenset({NetworkType.NAT, NetworkType.INTERNAL, NetworkType.PRIVATE})


@dataclass(frozen=True)
class Network:
    """One virtual switch.

    `gateway` is the address vmhive serves the network from: the host's address on
    the bridge for ``nat`` and ``internal`` (for ``nat`` it is also the VMs' default
    gateway), and the DHCP/DNS server's address inside its own namespace for
    ``private`` (not a router: DHCP offers no route there). ``external`` networks have
    no subnet, gateway or DHCP: the LAN provides them.
    """

    name: str
    type: NetworkType
    bridge: str
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    dhcp_range: tuple[IPv4Address, IPv4Address] | None = None
    lease_seconds: int = 3600
    domain: str | None = None
    uplink: str | None = None  # external: the host NIC enslaved to vmhive's bridge

    @property
    def owns_bridge(self) -> bool:
        """True when vmhive creates and deletes the bridge (False for an existing host bridge)."""
        return self.type != NetworkType.EXTERNAL or self.uplink is not None

    @property
    def gateway_interface(self) -> IPv4Interface:
        """The gateway with the subnet's prefix length (routed types only)."""
        if self.subnet is None or self.gateway is None:
            raise NetworkConfigError(f"network {self.name} has no subnet")
        return IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")


@dataclass(frozen=True)
class PortForward:
    """Connections to the host's `host_port` go to `vm_ip`:`vm_port` on a ``nat`` network.

    `host_ip` limits the forward to one host address; None means every local
    address, 127.0.0.1 included.
    """

    network: str
    proto: str
    host_port: int
    vm_ip: IPv4Address
    vm_port: int
    host_ip: IPv4Address | None = None


@dataclass(frozen=True)
class VmPort:
    """A VM's TAP device (or anything bridged in its place) and what it may send as.

    `ipv4` is None while the VM's address is not known yet: then only the source
    MAC is enforced.
    """

    tap: str
    mac: str
    ipv4: IPv4Address | None = None


@dataclass(frozen=True)
class DhcpReservation:
    """A static DHCP lease: `mac` always gets `ipv4` (and, if given, `hostname`)."""

    mac: str
    ipv4: IPv4Address
    hostname: str | None = None


@dataclass(frozen=True)
class Lease:
    """One IPv4 lease from dnsmasq's lease file. `expires` is None for an infinite lease."""

    mac: str
    ipv4: IPv4Address
    hostname: str | None
    expires: datetime | None
    client_id: str | None = None


# ---------------------------------------------------------------------------
# validation


def check_mac(mac: str, what: str = "MAC address") -> str:
    if not isinstance(mac, str) or not MAC_RE.fullmatch(mac):
        raise NetworkConfigError(
            f"{what} {mac!r} is invalid: expected lower-case xx:xx:xx:xx:xx:xx"
        )
    if int(mac[:2], 16) & 1:
        raise NetworkConfigError(f"{what} {mac} is a multicast address")
    return mac


def check_hostname(hostname: str) -> str:
    if not isinstance(hostname, str) or not HOSTNAME_RE.fullmatch(hostname):
        raise NetworkConfigError(
            f"hostname {hostname!r} is invalid: use 1-63 letters, digits and '-' "
            "(not at either end)"
        )
    return hostname


def _check_port(what: str, port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise NetworkConfigError(f"{what} must be an integer between 1 and 65535, got {port!r}")
    return port


def parse_subnet(value: str | IPv4Network) -> IPv4Network:
    """`value` as an IPv4 network; host bits must be zero (``10.0.0.1/24`` is refused)."""
    if isinstance(value, IPv4Network):
        return value
    try:
        net = ip_network(value, strict=True)
    except ValueError as exc:
        raise NetworkConfigError(f"subnet {value!r} is invalid: {exc}") from None
    if not isinstance(net, IPv4Network):
        raise NetworkConfigError(f"subnet {value!r} is not IPv4 (only IPv4 is supported)")
    return net


def parse_ipv4(value: str | IPv4Address, what: str = "address") -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        addr = ip_address(value)
    except ValueError:
        raise NetworkConfigError(f"{what} {value!r} is not an IP address") from None
    if not isinstance(addr, IPv4Address):
        raise NetworkConfigError(f"{what} {value!r} is not IPv4 (only IPv4 is supported)")
    return addr


def _check_host_address(net_name: str, what: str, addr: IPv4Address, subnet: IPv4Network) -> None:
    if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
        raise NetworkConfigError(
            f"network {net_name}: {what} {addr} is not a host address of {subnet}"
        )


def default_dhcp_range(
    subnet: IPv4Network, gateway: IPv4Address
) -> tuple[IPv4Address, IPv4Address]:
    """The largest run of host addresses of `subnet` that does not contain `gateway`.

    >>> default_dhcp_range(IPv4Network("10.77.0.0/24"), IPv4Address("10.77.0.1"))
    (IPv4Address('10.77.0.2'), IPv4Address('10.77.0.254'))
    >>> default_dhcp_range(IPv4Network("10.77.0.0/24"), IPv4Address("10.77.0.254"))
    (IPv4Address('10.77.0.1'), IPv4Address('10.77.0.253'))
    >>> default_dhcp_range(IPv4Network("10.77.0.0/24"), IPv4Address("10.77.0.100"))
    (IPv4Address('10.77.0.101'), IPv4Address('10.77.0.254'))
    """
    first = subnet.network_address + 1
    last = subnet.broadcast_address - 1
    below = int(gateway) - int(first)
    above = int(last) - int(gateway)
    if above >= below:
        return gateway + 1, last
    return first, gateway - 1


def validate_network(net: Network) -> None:
    """Raise `NetworkConfigError` unless `net` is complete and consistent."""
    check_network_name(net.name)
    try:
        kind = NetworkType(net.type)
    except ValueError:
        raise NetworkConfigError(
            f"network {net.name}: type {net.type!r} is not one of "
            f"{', '.join(t.value for t in NetworkType)}"
        ) from None
    check_ifname(net.bridge, f"network {net.name}: bridge name")
    if not isinstance(net.lease_seconds, int) or net.lease_seconds < MIN_LEASE_SECONDS:
        raise NetworkConfigError(
            f"network {net.name}: lease time must be at least {MIN_LEASE_SECONDS} s, "
            f"got {net.lease_seconds!r}"
        )
    if net.domain is not None and (
        not isinstance(net.domain, str)
        or not DOMAIN_RE.fullmatch(net.domain)
        or len(net.domain) > 253  # DNS's limit (and the column's)
    ):
        raise NetworkConfigError(f"network {net.name}: DNS domain {net.domain!r} is invalid")

    if kind == NetworkType.EXTERNAL:
        if net.subnet is not None or net.gateway is not None or net.dhcp_range is not None:
            raise NetworkConfigError(
                f"network {net.name}: an external network has no subnet, gateway or DHCP range "
                "(the LAN provides them)"
            )
        if net.uplink is not None:
            check_ifname(net.uplink, f"network {net.name}: uplink")
            if is_vmhive_ifname(net.uplink):
                raise NetworkConfigError(
                    f"network {net.name}: uplink {net.uplink} is a vmhive device, not a host NIC"
                )
            if not net.bridge.startswith(BRIDGE_PREFIX):
                raise NetworkConfigError(
                    f"network {net.name}: the bridge of an uplink must be a vmhive bridge "
                    f"({BRIDGE_PREFIX}...), got {net.bridge}"
                )
        elif is_vmhive_ifname(net.bridge):
            raise NetworkConfigError(
                f"network {net.name}: give either an uplink NIC or an existing host bridge; "
                f"{net.bridge} is a vmhive name"
            )
        return

    if net.uplink is not None:
        raise NetworkConfigError(f"network {net.name}: only external networks have an uplink")
    if not net.bridge.startswith(BRIDGE_PREFIX):
        raise NetworkConfigError(
            f"network {net.name}: bridge {net.bridge} must start with {BRIDGE_PREFIX}"
        )
    if not isinstance(net.subnet, IPv4Network):
        raise NetworkConfigError(f"network {net.name}: a {kind} network needs an IPv4 subnet")
    subnet = net.subnet
    if not MIN_PREFIXLEN <= subnet.prefixlen <= MAX_PREFIXLEN:
        raise NetworkConfigError(
            f"network {net.name}: subnet {subnet} must have a prefix length between "
            f"/{MIN_PREFIXLEN} and /{MAX_PREFIXLEN}"
        )
    if not isinstance(net.gateway, IPv4Address):
        raise NetworkConfigError(f"network {net.name}: a {kind} network needs a gateway address")
    _check_host_address(net.name, "gateway", net.gateway, subnet)
    if net.dhcp_range is None:
        raise NetworkConfigError(f"network {net.name}: a {kind} network needs a DHCP range")
    start, end = net.dhcp_range
    for what, addr in (("DHCP range start", start), ("DHCP range end", end)):
        if not isinstance(addr, IPv4Address):
            raise NetworkConfigError(f"network {net.name}: {what} {addr!r} is not an IPv4 address")
        _check_host_address(net.name, what, addr, subnet)
    if start > end:
        raise NetworkConfigError(f"network {net.name}: DHCP range {start}-{end} is empty")
    if start <= net.gateway <= end:
        raise NetworkConfigError(
            f"network {net.name}: DHCP range {start}-{end} contains the gateway {net.gateway}"
        )


def define_network(
    name: str,
    type: NetworkType | str,
    *,
    subnet: IPv4Network | str | None = None,
    gateway: IPv4Address | str | None = None,
    dhcp_range: tuple[IPv4Address | str, IPv4Address | str] | None = None,
    lease_seconds: int = 3600,
    domain: str | None = None,
    uplink: str | None = None,
    bridge: str | None = None,
) -> Network:
    """A validated `Network`, with defaults filled in.

    The bridge defaults to `bridge_name(name)` (an external network without an
    uplink must name its existing host bridge), the gateway to the subnet's first
    host address, and the DHCP range to the largest run of hosts beside the gateway.
    The subnet itself is not chosen here: see `vmhive.network.subnets`.
    """
    check_network_name(name)
    try:
        kind = NetworkType(type)
    except ValueError:
        raise NetworkConfigError(
            f"network {name}: type {type!r} is not one of {', '.join(t.value for t in NetworkType)}"
        ) from None
    if bridge is None:
        if kind == NetworkType.EXTERNAL and uplink is None:
            raise NetworkConfigError(
                f"network {name}: an external network needs an uplink NIC or an existing bridge"
            )
        bridge = bridge_name(name)
    net_subnet = parse_subnet(subnet) if subnet is not None else None
    net_gateway = parse_ipv4(gateway, "gateway") if gateway is not None else None
    if net_subnet is not None and net_gateway is None and kind in ROUTED_TYPES:
        net_gateway = net_subnet.network_address + 1
    net_range: tuple[IPv4Address, IPv4Address] | None = None
    if dhcp_range is not None:
        net_range = (
            parse_ipv4(dhcp_range[0], "DHCP range start"),
            parse_ipv4(dhcp_range[1], "DHCP range end"),
        )
    elif (
        net_subnet is not None
        and net_gateway is not None
        and kind in ROUTED_TYPES
        and net_gateway in net_subnet
    ):
        net_range = default_dhcp_range(net_subnet, net_gateway)
    net = Network(
        name=name,
        type=kind,
        bridge=bridge,
        subnet=net_subnet,
        gateway=net_gateway,
        dhcp_range=net_range,
        lease_seconds=lease_seconds,
        domain=domain,
        uplink=uplink,
    )
    validate_network(net)
    return net


def validate_port_forward(fwd: PortForward, networks: dict[str, Network]) -> None:
    """Raise `NetworkConfigError` unless `fwd` targets a VM address of a known ``nat`` network."""
    what = f"port forward {fwd.proto}/{fwd.host_port}"
    if fwd.proto not in PROTOCOLS:
        raise NetworkConfigError(f"{what}: protocol must be tcp or udp, got {fwd.proto!r}")
    _check_port(f"{what}: host port", fwd.host_port)
    _check_port(f"{what}: VM port", fwd.vm_port)
    net = networks.get(fwd.network)
    if net is None:
        raise NetworkConfigError(f"{what}: network {fwd.network!r} is not known")
    if net.type != NetworkType.NAT or net.subnet is None:
        raise NetworkConfigError(
            f"{what}: network {net.name} is {net.type}; ports can only be forwarded to nat networks"
        )
    if not isinstance(fwd.vm_ip, IPv4Address):
        raise NetworkConfigError(f"{what}: VM address {fwd.vm_ip!r} is not an IPv4 address")
    _check_host_address(net.name, f"{what}: VM address", fwd.vm_ip, net.subnet)
    if fwd.vm_ip == net.gateway:
        raise NetworkConfigError(f"{what}: {fwd.vm_ip} is the gateway, not a VM")
    if fwd.host_ip is not None and not isinstance(fwd.host_ip, IPv4Address):
        raise NetworkConfigError(f"{what}: host address {fwd.host_ip!r} is not an IPv4 address")


def validate_vm_port(port: VmPort) -> None:
    check_ifname(port.tap, "VM port device")
    check_mac(port.mac, f"VM port {port.tap}: MAC address")
    if port.ipv4 is not None and (
        not isinstance(port.ipv4, IPv4Address)
        or port.ipv4.is_unspecified
        or port.ipv4.is_multicast
        or port.ipv4 == IPv4Address("255.255.255.255")
    ):
        raise NetworkConfigError(f"VM port {port.tap}: {port.ipv4!r} is not a unicast IPv4 address")


def validate_reservation(res: DhcpReservation, net: Network) -> None:
    check_mac(res.mac, f"network {net.name}: reservation MAC")
    if net.subnet is None:
        raise NetworkConfigError(f"network {net.name} has no DHCP server for reservations")
    if not isinstance(res.ipv4, IPv4Address):
        raise NetworkConfigError(
            f"network {net.name}: reservation address {res.ipv4!r} is not IPv4"
        )
    _check_host_address(net.name, f"reservation for {res.mac}", res.ipv4, net.subnet)
    if res.ipv4 == net.gateway:
        raise NetworkConfigError(
            f"network {net.name}: reservation for {res.mac} uses the gateway {res.ipv4}"
        )
    if res.hostname is not None:
        check_hostname(res.hostname)
