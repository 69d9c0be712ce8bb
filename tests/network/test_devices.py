"""TAPs, bridges, external networks, conflicts and rollback, for real in namespaces."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from tests.network.conftest import NetnsFactory
from tests.network.helpers import random_token
from vmhive.network import (
    DhcpReservation,
    DnsmasqError,
    LinkConflictError,
    LinkError,
    NetworkConfigError,
    SubnetConflictError,
    VmPort,
    apply_firewall,
    attach_to_bridge,
    define_network,
    ensure_network,
    ensure_tap,
    firewall_tables,
    get_link,
    remove_firewall,
    remove_network,
    remove_tap,
    scan_host,
    set_link_up,
    tap_name,
)
from vmhive.network.links import ensure_bridge

pytestmark = pytest.mark.network


def test_tap_lifecycle(netns: NetnsFactory, run_dir: Path) -> None:
    host = netns("host")
    net = define_network("lab", "internal", subnet="10.77.20.0/24")
    host.call(ensure_network, net, run_dir)
    tap = tap_name("6f1c2a3e-0b7d-4c5e-9a1f-000000000002", 0)

    assert host.call(ensure_tap, tap, bridge=net.bridge, owner="vm test nic 0") is True
    link = host.call(get_link, tap)
    assert link is not None
    assert (link.is_tap, link.master, link.up, link.alias) == (
        True,
        net.bridge,
        True,
        "vmhive vm test nic 0",
    )
    assert host.sysctl(f"net/ipv6/conf/{tap}/disable_ipv6") == "1"
    assert "persist" in host.run("ip", "-d", "link", "show", tap).stdout
    assert host.call(ensure_tap, tap, bridge=net.bridge) is False  # idempotent

    host.call(set_link_up, tap, False)
    assert host.call(get_link, tap).up is False  # type: ignore[union-attr]
    host.call(set_link_up, tap, True)

    inventory = host.call(scan_host, run_dir)
    assert [t.name for t in inventory.taps] == [tap]
    assert [b.name for b in inventory.bridges] == [net.bridge]
    assert [d.network for d in inventory.dnsmasq] == ["lab"]
    assert inventory.dnsmasq[0].pid is not None

    assert host.call(remove_tap, tap) is True
    assert host.call(remove_tap, tap) is False
    assert host.call(get_link, tap) is None
    host.call(remove_network, net, run_dir)
    assert host.call(scan_host, run_dir).empty


def test_tap_name_taken_by_another_kind_of_device(netns: NetnsFactory) -> None:
    host = netns("host")
    host.call(ensure_bridge, "vh-bx", alias="test")
    host.run("ip", "link", "add", "vh-tveth", "type", "veth", "peer", "name", "other")
    with pytest.raises(LinkConflictError, match="not a TAP"):
        host.call(ensure_tap, "vh-tveth", bridge="vh-bx")
    with pytest.raises(NetworkConfigError, match="must start with vh-t"):
        host.call(ensure_tap, "tap0", bridge="vh-bx")


def test_failed_tap_set_up_leaves_no_tap(netns: NetnsFactory) -> None:
    host = netns("host")
    with pytest.raises(LinkError, match="no such bridge"):
        host.call(ensure_tap, "vh-tnobridge", bridge="vh-bmissing")
    assert host.call(get_link, "vh-tnobridge") is None


def test_vlan_access_port(netns: NetnsFactory) -> None:
    """VLAN access ports need CONFIG_BRIDGE_VLAN_FILTERING; without it the error says so."""
    host = netns("host")
    host.call(ensure_bridge, "vh-bvlan", alias="test")
    supported = host.run(
        "ip", "link", "add", "probe", "type", "bridge", "vlan_filtering", "1", check=False
    )
    if supported.returncode != 0:
        with pytest.raises(LinkError, match="VLAN filtering"):
            host.call(ensure_tap, "vh-tvlan", bridge="vh-bvlan", vlan=10)
        assert host.call(get_link, "vh-tvlan") is None
        return
    host.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    host.call(attach_to_bridge, "lan0", "vh-bvlan")
    host.call(ensure_tap, "vh-tvlan", bridge="vh-bvlan", vlan=10)
    vlans = host.run("bridge", "-j", "vlan", "show").stdout
    assert '"vlan":10' in vlans.replace(" ", "")
    host.call(remove_tap, "vh-tvlan")


def test_bridge_of_another_owner_is_refused(netns: NetnsFactory, run_dir: Path) -> None:
    host = netns("host")
    net = define_network("lab", "internal", subnet="10.77.21.0/24")
    host.call(ensure_bridge, net.bridge, alias="vmhive network someone-else")
    with pytest.raises(LinkConflictError, match="belongs to"):
        host.call(ensure_network, net, run_dir)
    with pytest.raises(LinkConflictError, match="is not its bridge"):
        host.call(remove_network, net, run_dir)


def test_subnet_overlapping_a_host_route_is_refused(netns: NetnsFactory, run_dir: Path) -> None:
    host = netns("host")
    host.run("ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth10")
    host.run("ip", "link", "set", "eth9", "up")
    host.run("ip", "addr", "add", "10.77.0.5/16", "dev", "eth9")
    net = define_network("lab", "nat", subnet="10.77.22.0/24")
    with pytest.raises(SubnetConflictError, match=r"overlaps host route 10\.77\.0\.0/16 dev eth9"):
        host.call(ensure_network, net, run_dir)
    assert host.call(get_link, net.bridge) is None


def test_invalid_reservation_fails_before_any_change(netns: NetnsFactory, run_dir: Path) -> None:
    host = netns("host")
    net = define_network("lab", "nat", subnet="10.77.25.0/24")
    bad = [DhcpReservation("52:54:00:00:00:01", IPv4Address("10.77.25.1"))]  # the gateway
    with pytest.raises(NetworkConfigError, match="uses the gateway"):
        host.call(ensure_network, net, run_dir, reservations=bad)
    assert host.call(get_link, net.bridge) is None
    assert not (run_dir / "lab").exists()


@pytest.mark.parametrize("kind", ["nat", "private"])
def test_failed_ensure_rolls_back(netns: NetnsFactory, run_dir: Path, kind: str) -> None:
    host = netns("host")
    net = define_network("lab", kind, subnet="10.77.23.0/24")
    with pytest.raises(DnsmasqError, match="failed to start"):
        host.call(ensure_network, net, run_dir, dnsmasq="/bin/false")
    inventory = host.call(scan_host, run_dir)
    assert inventory.empty, inventory
    assert not (run_dir / "lab").exists()


def test_external_network_with_uplink(netns: NetnsFactory, run_dir: Path) -> None:
    host, lan, vm = netns("host"), netns("lan"), netns("vm")
    host.veth_to(lan, "nic1", "eth0")
    lan.run("ip", "addr", "add", "192.0.2.10/24", "dev", "eth0")
    net = define_network("ext", "external", uplink="nic1")

    state = host.call(ensure_network, net, run_dir)
    assert state.dnsmasq_pid is None
    nic = host.call(get_link, "nic1")
    assert nic is not None and nic.master == net.bridge
    assert host.call(ensure_network, net, run_dir) == state  # idempotent

    tap = "vh-t" + random_token(11)
    host.veth_to(vm, tap, "eth0")
    vm.run("ip", "link", "set", "eth0", "address", "52:54:00:cc:00:01")
    vm.run("ip", "addr", "add", "192.0.2.20/24", "dev", "eth0")
    host.call(attach_to_bridge, tap, net.bridge)
    host.call(apply_firewall, [net], [], [VmPort(tap, "52:54:00:cc:00:01", None)])
    assert vm.ping("192.0.2.10")  # the VM is on the LAN
    assert "inet " not in host.run("ip", "-4", "addr", "show", "dev", net.bridge).stdout

    host.call(remove_tap, tap)
    host.call(remove_network, net, run_dir)
    host.call(remove_firewall)
    nic = host.call(get_link, "nic1")
    assert nic is not None and nic.master is None  # released, not deleted
    assert host.call(scan_host, run_dir).empty


def test_external_uplink_with_addresses_is_refused(netns: NetnsFactory, run_dir: Path) -> None:
    host, lan = netns("host"), netns("lan")
    host.veth_to(lan, "nic1", "eth0")
    host.run("ip", "addr", "add", "192.0.2.1/24", "dev", "nic1")
    net = define_network("ext", "external", uplink="nic1")
    with pytest.raises(LinkConflictError, match="has addresses of its own"):
        host.call(ensure_network, net, run_dir)
    assert host.call(get_link, net.bridge) is None  # rolled back
    assert "192.0.2.1/24" in host.run("ip", "-4", "addr", "show", "dev", "nic1").stdout


def test_external_network_on_an_existing_bridge(netns: NetnsFactory, run_dir: Path) -> None:
    host = netns("host")
    net = define_network("ext", "external", bridge="br0")
    with pytest.raises(LinkError, match="does not exist"):
        host.call(ensure_network, net, run_dir)
    host.run("ip", "link", "add", "br0", "type", "bridge")
    assert host.call(ensure_network, net, run_dir).bridge == "br0"
    host.call(ensure_tap, "vh-tbr0port", bridge="br0")
    host.call(remove_tap, "vh-tbr0port")
    host.call(remove_network, net, run_dir)
    assert host.call(get_link, "br0") is not None  # never vmhive's to delete


def test_firewall_tables_come_and_go(netns: NetnsFactory) -> None:
    host = netns("host")
    net = define_network("lab", "private", subnet="10.77.24.0/24")
    host.call(apply_firewall, [net], [], [VmPort("vh-tx", "52:54:00:00:00:01", None)])
    assert sorted(host.call(firewall_tables)) == ["bridge vmhive", "inet vmhive"]
    host.call(apply_firewall, [net], [], [])
    assert host.call(firewall_tables) == ["inet vmhive"]
    host.call(remove_firewall)
    host.call(remove_firewall)
    assert host.call(firewall_tables) == []
