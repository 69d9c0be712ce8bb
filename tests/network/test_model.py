"""Unit tests of the pure parts: names, network definitions, subnets (and their docstring examples)."""

from __future__ import annotations

import doctest
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from vmhive.network import dnsmasq_config, model, names, subnets
from vmhive.network.errors import NetworkConfigError, NoFreeSubnetError, SubnetConflictError
from vmhive.network.model import (
    Network,
    NetworkType,
    PortForward,
    VmPort,
    define_network,
    validate_port_forward,
    validate_vm_port,
)
from vmhive.network.names import bridge_name, check_ifname, dhcp_veth_name, tap_name
from vmhive.network.subnets import UsedNetwork, check_subnet, choose_subnet


@pytest.mark.parametrize("module", [names, model, subnets, dnsmasq_config])
def test_docstring_examples(module: Any) -> None:
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.failed == 0


# ---------------------------------------------------------------------------
# names


def test_bridge_names_fit_ifnamsiz() -> None:
    assert bridge_name("default") == "vh-bdefault"
    assert bridge_name("elevenchars") == "vh-belevenchars"
    long = bridge_name("twelve-chars")
    assert len(long) == 15 and long.startswith("vh-btwelve")
    assert bridge_name("lab-network-a") != bridge_name("lab-network-b")
    with pytest.raises(NetworkConfigError, match="network name"):
        bridge_name("Lab")


def test_tap_names_are_stable_and_distinct() -> None:
    uuid = "6f1c2a3e-0b7d-4c5e-9a1f-000000000002"
    names_ = {tap_name(uuid, i) for i in range(4)}
    assert len(names_) == 4
    assert all(len(n) == 15 and n.startswith("vh-t") for n in names_)
    assert tap_name(uuid, 0) == tap_name(uuid, 0)
    with pytest.raises(NetworkConfigError):
        tap_name(uuid, -1)


def test_ifname_check() -> None:
    assert check_ifname("vh-t0.a_b") == "vh-t0.a_b"
    for bad in ("", "x" * 16, 'a"b', "a b", "a/b", "a;b", "..", "a\nb"):
        with pytest.raises(NetworkConfigError):
            check_ifname(bad)
    assert dhcp_veth_name("vh-blab") == "vh-dlab"
    with pytest.raises(NetworkConfigError):
        dhcp_veth_name("br0")


# ---------------------------------------------------------------------------
# networks


def test_define_network_defaults() -> None:
    net = define_network("lab", "nat", subnet="10.77.3.0/24")
    assert net == Network(
        name="lab",
        type=NetworkType.NAT,
        bridge="vh-blab",
        subnet=IPv4Network("10.77.3.0/24"),
        gateway=IPv4Address("10.77.3.1"),
        dhcp_range=(IPv4Address("10.77.3.2"), IPv4Address("10.77.3.254")),
    )
    assert str(net.gateway_interface) == "10.77.3.1/24"
    assert net.owns_bridge


def test_define_network_with_gateway_at_the_end() -> None:
    net = define_network("lab", "internal", subnet="192.168.5.0/28", gateway="192.168.5.14")
    assert net.dhcp_range == (IPv4Address("192.168.5.1"), IPv4Address("192.168.5.13"))


def test_define_external_networks() -> None:
    uplinked = define_network("ext", "external", uplink="eth1")
    assert (uplinked.bridge, uplinked.subnet, uplinked.owns_bridge) == ("vh-bext", None, True)
    existing = define_network("ext", "external", bridge="br0")
    assert (existing.bridge, existing.owns_bridge) == ("br0", False)


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bad-type", {"type": "bridged"}, "type 'bridged'"),
    ("bad-name", {"name": "Lab"}, "network name"),
    ("no-subnet", {"subnet": None}, "needs an IPv4 subnet"),
    ("host-bits", {"subnet": "10.77.0.1/24"}, "host bits"),
    ("ipv6", {"subnet": "fd00::/64"}, "not IPv4"),
    ("too-small", {"subnet": "10.77.0.0/30"}, "prefix length"),
    ("too-big", {"subnet": "10.0.0.0/7"}, "prefix length"),
    ("gateway-outside", {"gateway": "10.1.1.1"}, "not a host address"),
    ("gateway-broadcast", {"gateway": "10.77.0.255"}, "not a host address"),
    ("range-has-gateway", {"dhcp_range": ("10.77.0.1", "10.77.0.9")}, "contains the gateway"),
    ("range-reversed", {"dhcp_range": ("10.77.0.9", "10.77.0.5")}, "is empty"),
    ("range-outside", {"dhcp_range": ("10.77.0.5", "10.77.1.9")}, "not a host address"),
    ("short-lease", {"lease_seconds": 60}, "at least 120"),
    ("bad-domain", {"domain": "-x.test"}, "DNS domain"),
    ("uplink-on-nat", {"uplink": "eth0"}, "only external networks"),
    ("foreign-bridge", {"bridge": "br0"}, "must start with vh-b"),
    ("bridge-injection", {"bridge": 'vh-b"x'}, "bridge name"),
    ("external-subnet", {"type": "external", "uplink": "eth0"}, "no subnet"),
    (
        "external-nothing",
        {"type": "external", "subnet": None},
        "needs an uplink NIC or an existing bridge",
    ),
    (
        "external-vmhive-uplink",
        {"type": "external", "subnet": None, "uplink": "vh-tabc"},
        "vmhive device",
    ),
]


@pytest.mark.parametrize(
    ("changes", "message"), [(c, m) for _, c, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_define_network_rejects(changes: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"name": "lab", "type": "nat", "subnet": "10.77.0.0/24", **changes}
    with pytest.raises(NetworkConfigError, match=message):
        define_network(kwargs.pop("name"), kwargs.pop("type"), **kwargs)


def test_port_forward_validation() -> None:
    nets = {
        "lab": define_network("lab", "nat", subnet="10.77.0.0/24"),
        "int": define_network("int", "internal", subnet="10.77.1.0/24"),
    }
    ok = PortForward("lab", "tcp", 8080, IPv4Address("10.77.0.10"), 80)
    validate_port_forward(ok, nets)
    cases = [
        (PortForward("lab", "sctp", 8080, IPv4Address("10.77.0.10"), 80), "tcp or udp"),
        (PortForward("lab", "tcp", 0, IPv4Address("10.77.0.10"), 80), "host port"),
        (PortForward("lab", "tcp", 8080, IPv4Address("10.77.0.10"), 70000), "VM port"),
        (PortForward("nope", "tcp", 8080, IPv4Address("10.77.0.10"), 80), "not known"),
        (PortForward("int", "udp", 53, IPv4Address("10.77.1.10"), 53), "only be forwarded to nat"),
        (PortForward("lab", "tcp", 8080, IPv4Address("10.77.9.10"), 80), "not a host address"),
        (PortForward("lab", "tcp", 8080, IPv4Address("10.77.0.1"), 80), "the gateway"),
    ]
    for fwd, message in cases:
        with pytest.raises(NetworkConfigError, match=message):
            validate_port_forward(fwd, nets)


def test_vm_port_validation() -> None:
    validate_vm_port(VmPort("vh-t1", "52:54:00:00:00:01", IPv4Address("10.77.0.5")))
    for port, message in [
        (VmPort("vh t1", "52:54:00:00:00:01"), "device"),
        (VmPort("vh-t1", "52:54:00:00:00:0G"), "MAC"),
        (VmPort("vh-t1", "52:54:00:AA:00:01"), "MAC"),
        (VmPort("vh-t1", "01:00:5e:00:00:01"), "multicast"),
        (VmPort("vh-t1", "52:54:00:00:00:01", IPv4Address("0.0.0.0")), "unicast"),
    ]:
        with pytest.raises(NetworkConfigError, match=message):
            validate_vm_port(port)


# ---------------------------------------------------------------------------
# subnets


def _used(*nets: str) -> list[UsedNetwork]:
    return [UsedNetwork(IPv4Network(n), f"route {n}") for n in nets]


def test_choose_subnet_skips_everything_used() -> None:
    assert choose_subnet([]) == IPv4Network("10.77.0.0/24")
    assert choose_subnet(_used("10.77.0.0/24", "10.77.1.0/25")) == IPv4Network("10.77.2.0/24")
    # A wide route (a VPN's 10/8) pushes the choice to the next pool.
    assert choose_subnet(_used("10.0.0.0/8")) == IPv4Network("192.168.0.0/24")
    assert choose_subnet(_used("10.0.0.0/8", "192.168.0.0/17")) == IPv4Network("192.168.128.0/24")
    assert choose_subnet([], prefixlen=20) == IPv4Network("10.77.0.0/20")


def test_choose_subnet_gives_up_clearly() -> None:
    with pytest.raises(NoFreeSubnetError, match="no free /24 subnet"):
        choose_subnet(_used("10.0.0.0/8", "192.168.0.0/16"))
    with pytest.raises(NoFreeSubnetError):
        choose_subnet([], pools=[IPv4Network("10.1.0.0/24")], prefixlen=16)


def test_check_subnet() -> None:
    assert check_subnet("172.20.0.0/16", _used("10.0.0.0/8")) == IPv4Network("172.20.0.0/16")
    with pytest.raises(SubnetConflictError, match=r"overlaps route 10\.0\.0\.0/8"):
        check_subnet("10.77.0.0/24", _used("10.0.0.0/8"))
    with pytest.raises(SubnetConflictError):
        check_subnet("10.0.0.0/8", _used("10.77.5.0/24"))  # the wider one overlaps too
    for bad, message in [
        ("127.1.0.0/16", "loopback"),
        ("169.254.1.0/24", "link-local"),
        ("224.1.0.0/16", "multicast"),
        ("10.0.0.0/30", "prefix length"),
        ("10.0.0.1/24", "host bits"),
        ("nonsense", "invalid"),
    ]:
        with pytest.raises(NetworkConfigError, match=message):
            check_subnet(bad, [])
