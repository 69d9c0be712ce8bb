"""Unit tests of `vmhive.network.firewall.render_ruleset` (and one `nft -c` check of its output)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tests.network.conftest import NetnsFactory
from vmhive.network import (
    NetworkConfigError,
    PortForward,
    VmPort,
    define_network,
    render_ruleset,
)

NETWORKS = [
    define_network("lab", "nat", subnet="10.77.0.0/24"),
    define_network("web", "nat", subnet="10.77.1.0/24"),
    define_network("int", "internal", subnet="10.77.2.0/24"),
    define_network("priv", "private", subnet="10.77.3.0/24"),
    define_network("ext", "external", uplink="eth1"),
]
FORWARDS = [
    PortForward("lab", "tcp", 8080, IPv4Address("10.77.0.10"), 80),
    PortForward(
        "web", "udp", 5353, IPv4Address("10.77.1.20"), 53, host_ip=IPv4Address("192.0.2.1")
    ),
]
PORTS = [
    VmPort("vh-t00000000002", "52:54:00:00:00:02", None),
    VmPort("vh-t00000000001", "52:54:00:00:00:01", IPv4Address("10.77.0.10")),
]

# The whole ruleset for the data above, reviewed line by line.
EXPECTED = (
    "#!/usr/sbin/nft -f\n"
    "# vmhive: generated, do not edit\n"
    "table inet vmhive {}\n"
    "delete table inet vmhive\n"
    "table bridge vmhive {}\n"
    "delete table bridge vmhive\n"
    "table inet vmhive {\n"
    "\tchain prerouting_nat {\n"
    "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
    '\t\tmeta nfproto ipv4 fib daddr type local tcp dport 8080 dnat ip to 10.77.0.10:80 comment "network lab"\n'
    '\t\tmeta nfproto ipv4 ip daddr 192.0.2.1 udp dport 5353 dnat ip to 10.77.1.20:53 comment "network web"\n'
    "\t}\n"
    "\tchain output_nat {\n"
    "\t\ttype nat hook output priority -100; policy accept;\n"
    '\t\tmeta nfproto ipv4 fib daddr type local tcp dport 8080 dnat ip to 10.77.0.10:80 comment "network lab"\n'
    '\t\tmeta nfproto ipv4 ip daddr 192.0.2.1 udp dport 5353 dnat ip to 10.77.1.20:53 comment "network web"\n'
    "\t}\n"
    "\tchain postrouting_nat {\n"
    "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
    '\t\tip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade comment "network lab"\n'
    '\t\toifname "vh-blab" ip saddr 127.0.0.0/8 masquerade\n'
    '\t\toifname "vh-blab" ip saddr 10.77.0.0/24 ct status dnat masquerade\n'
    '\t\tip saddr 10.77.1.0/24 ip daddr != 10.77.1.0/24 masquerade comment "network web"\n'
    '\t\toifname "vh-bweb" ip saddr 127.0.0.0/8 masquerade\n'
    '\t\toifname "vh-bweb" ip saddr 10.77.1.0/24 ct status dnat masquerade\n'
    "\t}\n"
    "\tchain forward {\n"
    "\t\ttype filter hook forward priority filter; policy accept;\n"
    '\t\tiifname "vh-blab" oifname "vh-blab" accept\n'
    '\t\tiifname "vh-bweb" oifname "vh-bweb" accept\n'
    '\t\tiifname "vh-bint" oifname "vh-bint" accept\n'
    '\t\tiifname "vh-bpriv" oifname "vh-bpriv" accept\n'
    '\t\tiifname "vh-bint" drop\n'
    '\t\toifname "vh-bint" drop\n'
    '\t\tiifname "vh-bpriv" drop\n'
    '\t\toifname "vh-bpriv" drop\n'
    '\t\toifname "vh-blab" ct state established,related accept\n'
    '\t\toifname "vh-blab" ct status dnat accept\n'
    '\t\toifname "vh-bweb" ct state established,related accept\n'
    '\t\toifname "vh-bweb" ct status dnat accept\n'
    '\t\tiifname "vh-blab" oifname "vh-bweb" drop\n'
    '\t\tiifname "vh-bweb" oifname "vh-blab" drop\n'
    '\t\tiifname "vh-blab" ip saddr 10.77.0.0/24 accept\n'
    '\t\tiifname "vh-bweb" ip saddr 10.77.1.0/24 accept\n'
    '\t\tiifname "vh-blab" drop\n'
    '\t\toifname "vh-blab" drop\n'
    '\t\tiifname "vh-bweb" drop\n'
    '\t\toifname "vh-bweb" drop\n'
    "\t}\n"
    "\tchain input {\n"
    "\t\ttype filter hook input priority filter; policy accept;\n"
    '\t\tiifname { "vh-blab", "vh-bweb" } ip daddr 127.0.0.0/8 ct direction original drop\n'
    '\t\tiifname "vh-bpriv" drop\n'
    "\t}\n"
    "\tchain output {\n"
    "\t\ttype filter hook output priority filter; policy accept;\n"
    '\t\toifname "vh-bpriv" drop\n'
    "\t}\n"
    "}\n"
    "table bridge vmhive {\n"
    "\tchain prerouting {\n"
    "\t\ttype filter hook prerouting priority filter; policy accept;\n"
    '\t\tiifname vmap { "vh-t00000000001" : jump port-vh-t00000000001, "vh-t00000000002" : jump port-vh-t00000000002 }\n'
    "\t}\n"
    "\tchain port-vh-t00000000001 {\n"
    "\t\tether saddr != 52:54:00:00:00:01 drop\n"
    "\t\tether type { 8021q, 8021ad } drop\n"
    "\t\tether type arp arp saddr ether != 52:54:00:00:00:01 drop\n"
    "\t\tether type ip udp sport 67 drop\n"
    "\t\tether type arp arp saddr ip != { 0.0.0.0, 10.77.0.10 } drop\n"
    "\t\tip saddr 10.77.0.10 accept\n"
    "\t\tip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n"
    "\t\tether type ip drop\n"
    "\t}\n"
    "\tchain port-vh-t00000000002 {\n"
    "\t\tether saddr != 52:54:00:00:00:02 drop\n"
    "\t\tether type { 8021q, 8021ad } drop\n"
    "\t\tether type arp arp saddr ether != 52:54:00:00:00:02 drop\n"
    "\t\tether type ip udp sport 67 drop\n"
    "\t}\n"
    "}\n"
)

DELETE_ONLY = (
    "#!/usr/sbin/nft -f\n"
    "# vmhive: generated, do not edit\n"
    "table inet vmhive {}\n"
    "delete table inet vmhive\n"
    "table bridge vmhive {}\n"
    "delete table bridge vmhive\n"
)


def test_full_ruleset() -> None:
    assert render_ruleset(NETWORKS, FORWARDS, PORTS).splitlines() == EXPECTED.splitlines()


def test_rendering_is_deterministic() -> None:
    shuffled = render_ruleset(NETWORKS, list(reversed(FORWARDS)), list(reversed(PORTS)))
    assert shuffled == render_ruleset(NETWORKS, FORWARDS, PORTS)


def test_nothing_to_enforce_deletes_the_tables() -> None:
    assert render_ruleset([]) == DELETE_ONLY
    # External networks alone need no inet rules.
    assert render_ruleset([NETWORKS[-1]]) == DELETE_ONLY


def test_only_ports_give_only_the_bridge_table() -> None:
    text = render_ruleset([], [], PORTS[:1])
    assert "table inet vmhive {\n" not in text
    assert "table bridge vmhive {\n" in text


def test_single_network_has_no_isolation_rule() -> None:
    text = render_ruleset(NETWORKS[:1])
    assert 'oifname "vh-blab" ct state established,related accept' in text
    assert "oifname {" not in text and "prerouting_nat" not in text


INVALID = [
    ("duplicate-network", [NETWORKS[0], NETWORKS[0]], [], [], "listed twice"),
    (
        "shared-bridge",
        [NETWORKS[0], define_network("lab2", "nat", subnet="10.77.9.0/24", bridge="vh-blab")],
        [],
        [],
        "share bridge",
    ),
    (
        "overlapping-subnets",
        [NETWORKS[0], define_network("lab2", "internal", subnet="10.77.0.0/16")],
        [],
        [],
        "overlaps network lab",
    ),
    (
        "forward-to-internal",
        NETWORKS,
        [PortForward("int", "tcp", 22, IPv4Address("10.77.2.5"), 22)],
        [],
        "only be forwarded to nat",
    ),
    (
        "forward-twice",
        NETWORKS,
        [*FORWARDS, PortForward("web", "tcp", 8080, IPv4Address("10.77.1.5"), 80)],
        [],
        "forwarded twice",
    ),
    (
        "forward-twice-one-host-ip",
        NETWORKS,
        [*FORWARDS, PortForward("lab", "udp", 5353, IPv4Address("10.77.0.5"), 53)],
        [],
        "forwarded twice",
    ),
    ("port-twice", NETWORKS, [], [PORTS[0], PORTS[0]], "listed twice"),
    (
        "port-name-injection",
        NETWORKS,
        [],
        [VmPort('vh-t" accept', "52:54:00:00:00:09")],
        "VM port device",
    ),
]


@pytest.mark.parametrize(
    ("networks", "forwards", "ports", "message"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_input_is_refused(
    networks: list, forwards: list, ports: list, message: str
) -> None:
    with pytest.raises(NetworkConfigError, match=message):
        render_ruleset(networks, forwards, ports)


def test_forwards_on_distinct_host_addresses_may_share_a_port() -> None:
    forwards = [
        PortForward(
            "lab", "tcp", 80, IPv4Address("10.77.0.10"), 80, host_ip=IPv4Address("192.0.2.1")
        ),
        PortForward(
            "web", "tcp", 80, IPv4Address("10.77.1.10"), 80, host_ip=IPv4Address("192.0.2.2")
        ),
    ]
    text = render_ruleset(NETWORKS, forwards)
    assert text.count("dnat ip to") == 4  # two rules, in prerouting and output each


@pytest.mark.network
def test_nft_accepts_the_full_ruleset(netns: NetnsFactory) -> None:
    host = netns("host")
    host.run("nft", "-c", "-f", "-", input=render_ruleset(NETWORKS, FORWARDS, PORTS))
