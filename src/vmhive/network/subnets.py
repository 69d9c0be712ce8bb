"""Choosing and checking the IPv4 subnet of a network.

A subnet must not overlap anything the host already routes or has an address
in: a VM network over the host's LAN or a VPN's range would hijack that
traffic. `host_used_networks` reads the host's routes (every table but
``local``) and addresses through netlink; `check_subnet` and `choose_subnet`
are pure and take that list (plus the subnets of vmhive's own networks, which
private networks never put into the host's routing table) as data.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmhive.network.errors import (
    LinkError,
    NetworkConfigError,
    NoFreeSubnetError,
    SubnetConflictError,
)
from vmhive.network.model import MAX_PREFIXLEN, MIN_PREFIXLEN, parse_subnet

#: Where subnets are chosen from, in order.
DEFAULT_POOLS: Final = (IPv4Network("10.77.0.0/16"), IPv4Network("192.168.0.0/16"))

#: Ranges that can never be a VM network (RFC 6890 special purpose blocks).
_RESERVED: Final = (
    (IPv4Network("0.0.0.0/8"), "'this network'"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved"),
)

_RT_TABLE_LOCAL: Final = 255
_RTN_MULTICAST: Final = 5


@dataclass(frozen=True)
class UsedNetwork:
    """A range that is taken, and by what (for the error message)."""

    network: IPv4Network
    source: str


def check_subnet(subnet: IPv4Network | str, used: Iterable[UsedNetwork]) -> IPv4Network:
    """Return `subnet` as an `IPv4Network` if a network may use it, else raise.

    >>> check_subnet("10.77.3.0/24", [UsedNetwork(IPv4Network("10.77.0.0/24"), "network a")])
    IPv4Network('10.77.3.0/24')
    >>> check_subnet("10.0.0.0/16", [UsedNetwork(IPv4Network("10.0.5.0/24"), "route ...")])
    Traceback (most recent call last):
    ...
    vmhive.network.errors.SubnetConflictError: subnet 10.0.0.0/16 overlaps route ... (10.0.5.0/24)
    """
    net = parse_subnet(subnet)
    if not MIN_PREFIXLEN <= net.prefixlen <= MAX_PREFIXLEN:
        raise NetworkConfigError(
            f"subnet {net} must have a prefix length between /{MIN_PREFIXLEN} and /{MAX_PREFIXLEN}"
        )
    for special, what in _RESERVED:
        if net.overlaps(special):
            raise NetworkConfigError(f"subnet {net} overlaps the {what} range {special}")
    for entry in used:
        if net.overlaps(entry.network):
            raise SubnetConflictError(f"subnet {net} overlaps {entry.source} ({entry.network})")
    return net


def choose_subnet(
    used: Iterable[UsedNetwork],
    *,
    pools: Sequence[IPv4Network] = DEFAULT_POOLS,
    prefixlen: int = 24,
) -> IPv4Network:
    """The first subnet of size `prefixlen` in `pools` that overlaps nothing in `used`.

    >>> taken = [UsedNetwork(IPv4Network("10.77.0.0/23"), "route")]
    >>> choose_subnet(taken)
    IPv4Network('10.77.2.0/24')
    >>> choose_subnet([UsedNetwork(IPv4Network("10.0.0.0/8"), "vpn")])
    IPv4Network('192.168.0.0/24')
    """
    taken = [entry.network for entry in used]
    for pool in pools:
        if prefixlen < pool.prefixlen:
            continue
        for candidate in pool.subnets(new_prefix=prefixlen):
            if not any(candidate.overlaps(net) for net in taken):
                return candidate
    raise NoFreeSubnetError(
        f"no free /{prefixlen} subnet in {', '.join(str(p) for p in pools)}: "
        "give the network a subnet explicitly"
    )


def host_used_networks(*, ignore_links: Iterable[str] = ()) -> list[UsedNetwork]:
    """The IPv4 ranges this host routes or has addresses in (default routes excluded).

    Routes and addresses on `ignore_links` (e.g. a network's own bridge, when
    checking that network again) are left out.
    """
    ignored = set(ignore_links)
    used: list[UsedNetwork] = []
    try:
        with IPRoute() as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            for route in ipr.route("dump", family=socket.AF_INET):
                table = route.get_attr("RTA_TABLE") or route["table"]
                if table == _RT_TABLE_LOCAL or route["type"] == _RTN_MULTICAST:
                    continue
                prefixlen = route["dst_len"]
                if prefixlen == 0:
                    continue  # default routes: everything else goes there by design
                dev = names.get(route.get("oif"))
                if dev in ignored:
                    continue
                net = IPv4Network(f"{route.get('dst')}/{prefixlen}", strict=False)
                where = f" dev {dev}" if dev else ""
                table_text = "" if table == 254 else f" table {table}"
                used.append(UsedNetwork(net, f"host route {net}{where}{table_text}"))
            for addr in ipr.get_addr(family=socket.AF_INET):
                dev = names.get(addr["index"])
                if dev in ignored:
                    continue
                iface = f"{addr.get('address')}/{addr['prefixlen']}"
                used.append(
                    UsedNetwork(IPv4Network(iface, strict=False), f"host address {iface} on {dev}")
                )
    except NetlinkError as exc:
        raise LinkError(f"cannot read the host's routes: {exc.args[-1]}") from None
    return used
