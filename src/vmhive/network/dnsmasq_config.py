"""dnsmasq's configuration, static reservations and lease file, as pure text functions.

One dnsmasq serves one network, from files in a directory of its own
(`DnsmasqPaths`). Design choices, as rendered by `render_config`:

* It binds only to its network's interface (``interface=`` +
  ``bind-interfaces``, ``except-interface=lo``), reads no ``/etc/hosts``
  (``no-hosts``) and no other configuration file (``--conf-file`` on the
  command line replaces ``/etc/dnsmasq.conf``).
* DHCP is authoritative for the subnet. Reservations live in a separate
  ``dhcp-hostsfile`` that dnsmasq re-reads on SIGHUP, so they change without a
  restart.
* DNS: every network's dnsmasq answers for its DHCP clients' names (and the
  network's ``domain``). Only ``nat`` networks forward other queries, to the
  host's resolvers from ``/etc/resolv.conf``; ``internal`` and ``private``
  networks have no way out, so they do not get one through DNS either
  (``no-resolv``).
* The router option is offered only on ``nat`` networks; VMs of the other
  types get an address and no default route.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final

from vmhive.network.errors import NetworkConfigError
from vmhive.network.model import (
    MAC_RE,
    DhcpReservation,
    Lease,
    Network,
    NetworkType,
    validate_reservation,
)

#: The DHCP server's interface inside a private network's own namespace.
PRIVATE_DHCP_IFNAME: Final = "dhcp0"
RESOLV_CONF: Final = "/etc/resolv.conf"


@dataclass(frozen=True)
class DnsmasqPaths:
    """The files of one network's dnsmasq, all in `directory`."""

    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "dnsmasq.conf"

    @property
    def pidfile(self) -> Path:
        return self.directory / "dnsmasq.pid"

    @property
    def leases(self) -> Path:
        return self.directory / "dnsmasq.leases"

    @property
    def hostsfile(self) -> Path:
        return self.directory / "dnsmasq.hosts"

    @property
    def log(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def stderr(self) -> Path:
        """dnsmasq's start-up errors (it reports them on stderr before it daemonizes)."""
        return self.directory / "dnsmasq.stderr"


def dnsmasq_interface(net: Network) -> str:
    """The interface dnsmasq serves: the bridge, or for private networks its namespace's veth."""
    return PRIVATE_DHCP_IFNAME if net.type == NetworkType.PRIVATE else net.bridge


def _check_path(path: Path) -> str:
    text = str(path)
    if not path.is_absolute() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise NetworkConfigError(
            f"dnsmasq path {text!r} must be absolute, without control characters"
        )
    return text


def render_config(net: Network, paths: DnsmasqPaths, *, user: str, group: str) -> str:
    """The dnsmasq configuration file of `net`.

    `user` and `group` are what dnsmasq drops its privileges to once its sockets
    and files are open.
    """
    if net.type == NetworkType.EXTERNAL or net.subnet is None or net.gateway is None:
        raise NetworkConfigError(f"network {net.name} ({net.type}) has no DHCP server")
    if net.dhcp_range is None:
        raise NetworkConfigError(f"network {net.name} has no DHCP range")
    start, end = net.dhcp_range
    lines = [
        f"# dnsmasq of vmhive network {net.name} ({net.type}): generated, do not edit",
        f"pid-file={_check_path(paths.pidfile)}",
        f"log-facility={_check_path(paths.log)}",
        f"dhcp-leasefile={_check_path(paths.leases)}",
        f"dhcp-hostsfile={_check_path(paths.hostsfile)}",
        f"user={user}",
        f"group={group}",
        f"interface={dnsmasq_interface(net)}",
        "bind-interfaces",
        "except-interface=lo",
        "no-hosts",
        f"dhcp-range={start},{end},{net.subnet.netmask},{net.lease_seconds}",
        "dhcp-authoritative",
        "quiet-dhcp",  # no log line per DHCP exchange: the log would grow with every renewal
    ]
    if net.type == NetworkType.NAT:
        lines.append(f"dhcp-option=option:router,{net.gateway}")
    else:
        lines.append("dhcp-option=option:router")  # an empty option: offer no router at all
    lines.append(f"dhcp-option=option:dns-server,{net.gateway}")
    if net.domain is not None:
        lines += [f"domain={net.domain}", f"local=/{net.domain}/"]
    if net.type == NetworkType.NAT:
        lines += [f"resolv-file={RESOLV_CONF}", "domain-needed", "bogus-priv"]
    else:
        lines.append("no-resolv")
    return "".join(f"{line}\n" for line in lines)


def render_hostsfile(net: Network, reservations: Iterable[DhcpReservation]) -> str:
    """dnsmasq's ``dhcp-hostsfile``: one ``MAC,IP[,HOSTNAME]`` line per reservation,
    e.g. ``52:54:00:00:00:01,10.77.0.9,web``. A MAC or address reserved twice is refused.
    """
    by_mac: dict[str, DhcpReservation] = {}
    by_ip: dict[IPv4Address, DhcpReservation] = {}
    lines = []
    for res in sorted(reservations, key=lambda r: (r.ipv4, r.mac)):
        validate_reservation(res, net)
        if res.mac in by_mac:
            raise NetworkConfigError(f"network {net.name}: {res.mac} has two reservations")
        if res.ipv4 in by_ip:
            raise NetworkConfigError(
                f"network {net.name}: {res.ipv4} is reserved for both {by_ip[res.ipv4].mac} "
                f"and {res.mac}"
            )
        by_mac[res.mac] = by_ip[res.ipv4] = res
        fields = [res.mac, str(res.ipv4)]
        if res.hostname is not None:
            fields.append(res.hostname)
        lines.append(",".join(fields))
    return "".join(f"{line}\n" for line in lines)


def parse_leases(text: str) -> dict[str, Lease]:
    """The IPv4 leases of a dnsmasq lease file, by MAC (the latest when a MAC has several).

    Each IPv4 line is ``EXPIRY MAC IP HOSTNAME CLIENT-ID`` with ``*`` for an
    unknown hostname or client id and an expiry of 0 for an infinite lease;
    DHCPv6 lines (after the ``duid`` line) and malformed lines are skipped.

    >>> leases = parse_leases("1700000000 52:54:00:12:34:56 10.77.0.57 vm1 01:52:54:00:12:34:56\\n")
    >>> leases["52:54:00:12:34:56"].ipv4, leases["52:54:00:12:34:56"].hostname
    (IPv4Address('10.77.0.57'), 'vm1')
    """
    leases: dict[str, Lease] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] == "duid":
            continue
        expiry, mac, ip, hostname = fields[:4]
        mac = mac.lower()
        if not MAC_RE.fullmatch(mac) or not expiry.isdigit():
            continue
        try:
            ipv4 = IPv4Address(ip)
        except ValueError:
            continue
        client_id = fields[4] if len(fields) > 4 and fields[4] != "*" else None
        seconds = int(expiry)
        lease = Lease(
            mac=mac,
            ipv4=ipv4,
            hostname=None if hostname == "*" else hostname,
            expires=None if seconds == 0 else datetime.fromtimestamp(seconds, UTC),
            client_id=client_id,
        )
        previous = leases.get(mac)
        if previous is None or _later(lease, previous):
            leases[mac] = lease
    return leases


def _later(a: Lease, b: Lease) -> bool:
    if b.expires is None:
        return False
    return a.expires is None or a.expires > b.expires
