"""Unit tests of dnsmasq's configuration, reservations file and lease file parser."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vmhive.network import DhcpReservation, NetworkConfigError, define_network
from vmhive.network.dnsmasq_config import (
    DnsmasqPaths,
    parse_leases,
    render_config,
    render_hostsfile,
)

PATHS = DnsmasqPaths(Path("/run/vmhive/networks/lab"))


def test_nat_config() -> None:
    net = define_network("lab", "nat", subnet="10.77.0.0/24", domain="lab.test", lease_seconds=600)
    assert render_config(net, PATHS, user="dnsmasq", group="nogroup").splitlines() == [
        "# dnsmasq of vmhive network lab (nat): generated, do not edit",
        "pid-file=/run/vmhive/networks/lab/dnsmasq.pid",
        "log-facility=/run/vmhive/networks/lab/dnsmasq.log",
        "dhcp-leasefile=/run/vmhive/networks/lab/dnsmasq.leases",
        "dhcp-hostsfile=/run/vmhive/networks/lab/dnsmasq.hosts",
        "user=dnsmasq",
        "group=nogroup",
        "interface=vh-blab",
        "bind-interfaces",
        "except-interface=lo",
        "no-hosts",
        "dhcp-range=10.77.0.2,10.77.0.254,255.255.255.0,600",
        "dhcp-authoritative",
        "quiet-dhcp",
        "dhcp-option=option:router,10.77.0.1",
        "dhcp-option=option:dns-server,10.77.0.1",
        "domain=lab.test",
        "local=/lab.test/",
        "resolv-file=/etc/resolv.conf",
        "domain-needed",
        "bogus-priv",
    ]


def test_internal_config_offers_no_router_and_no_upstream_dns() -> None:
    net = define_network("int", "internal", subnet="10.77.2.0/24")
    lines = render_config(net, PATHS, user="nobody", group="nogroup").splitlines()
    assert "dhcp-option=option:router" in lines
    assert "no-resolv" in lines
    assert "interface=vh-bint" in lines
    assert not any(line.startswith(("resolv-file", "domain=")) for line in lines)


def test_private_config_serves_from_its_namespace() -> None:
    net = define_network("priv", "private", subnet="10.77.3.0/24")
    lines = render_config(net, PATHS, user="nobody", group="nogroup").splitlines()
    assert "interface=dhcp0" in lines
    assert "dhcp-option=option:dns-server,10.77.3.1" in lines
    assert "dhcp-option=option:router" in lines


def test_config_refuses_external_and_relative_paths() -> None:
    with pytest.raises(NetworkConfigError, match="no DHCP server"):
        render_config(define_network("ext", "external", uplink="eth1"), PATHS, user="u", group="g")
    net = define_network("lab", "nat", subnet="10.77.0.0/24")
    with pytest.raises(NetworkConfigError, match="absolute"):
        render_config(net, DnsmasqPaths(Path("relative/lab")), user="u", group="g")
    with pytest.raises(NetworkConfigError, match="control characters"):
        render_config(net, DnsmasqPaths(Path("/run/x\ny")), user="u", group="g")


def test_hostsfile() -> None:
    net = define_network("lab", "nat", subnet="10.77.0.0/24")
    text = render_hostsfile(
        net,
        [
            DhcpReservation("52:54:00:00:00:02", IPv4Address("10.77.0.20")),
            DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.10"), "web"),
        ],
    )
    assert text == "52:54:00:00:00:01,10.77.0.10,web\n52:54:00:00:00:02,10.77.0.20\n"
    assert render_hostsfile(net, []) == ""


@pytest.mark.parametrize(
    ("reservations", "message"),
    [
        (
            [
                DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.10")),
                DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.11")),
            ],
            "two reservations",
        ),
        (
            [
                DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.10")),
                DhcpReservation("52:54:00:00:00:02", IPv4Address("10.77.0.10")),
            ],
            "reserved for both",
        ),
        ([DhcpReservation("52:54:00:00:00:01", IPv4Address("10.78.0.10"))], "not a host address"),
        ([DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.1"))], "gateway"),
        ([DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.0.9"), "a,b")], "hostname"),
        ([DhcpReservation("52-54-00-00-00-01", IPv4Address("10.77.0.9"))], "MAC"),
    ],
)
def test_hostsfile_refuses(reservations: list[DhcpReservation], message: str) -> None:
    net = define_network("lab", "nat", subnet="10.77.0.0/24")
    with pytest.raises(NetworkConfigError, match=message):
        render_hostsfile(net, reservations)


def test_parse_leases() -> None:
    text = (
        "1700000000 52:54:00:12:34:56 10.77.0.57 vm1 01:52:54:00:12:34:56\n"
        "0 52:54:00:12:34:57 10.77.0.58 * *\n"
        "1700000100 52:54:00:12:34:56 10.77.0.59 vm1b *\n"  # the same MAC again, later
        "1600000000 52:54:00:12:34:56 10.77.0.60 old *\n"
        "garbage line\n"
        "1700000000 not-a-mac 10.77.0.61 x *\n"
        "duid 00:01:00:01:2c:4b:6f:a3:52:54:00:12:34:56\n"
        "1700000000 1234 fd00::5 vm1 00:01:00:01\n"
    )
    leases = parse_leases(text)
    assert set(leases) == {"52:54:00:12:34:56", "52:54:00:12:34:57"}
    first = leases["52:54:00:12:34:56"]
    assert (first.ipv4, first.hostname, first.client_id) == (
        IPv4Address("10.77.0.59"),
        "vm1b",
        None,
    )
    assert first.expires == datetime.fromtimestamp(1700000100, UTC)
    infinite = leases["52:54:00:12:34:57"]
    assert (infinite.hostname, infinite.expires, infinite.client_id) == (None, None, None)
    assert parse_leases("") == {}
