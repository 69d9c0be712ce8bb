"""Isolation between networks, and the internal and private network types, in namespaces.

One host with an uplink to "inet" carries two nat networks (a, b), an internal
network and a private network; each VM is a namespace plugged into its
network's bridge by a veth named like a TAP.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from tests.network.conftest import NetnsFactory
from tests.network.helpers import (
    Netns,
    dhcp,
    processes_with_arg_prefix,
    random_token,
    start_tcp_server,
    tcp_request,
    wait_until,
)
from vmhive.network import (
    Network,
    VmPort,
    apply_firewall,
    attach_to_bridge,
    define_network,
    ensure_network,
    get_link,
    remove_firewall,
    remove_network,
    remove_tap,
    scan_host,
    set_link_up,
)
from vmhive.network.dnsmasq import find_dnsmasq
from vmhive.network.names import dhcp_veth_name
from vmhive.network.networks import dnsmasq_paths

pytestmark = pytest.mark.network

HOST_UPLINK = "198.51.100.1"
INET = "198.51.100.2"


@dataclass
class Vm:
    ns: Netns
    tap: str
    mac: str
    ip: IPv4Address | None = None
    lease: str = ""


@dataclass
class Lab:
    host: Netns
    inet: Netns
    run_dir: Path
    networks: dict[str, Network]
    vms: dict[str, Vm] = field(default_factory=dict)

    def firewall(self) -> None:
        ports = [VmPort(vm.tap, vm.mac, vm.ip) for vm in self.vms.values()]
        self.host.call(apply_firewall, list(self.networks.values()), [], ports)


@pytest.fixture(scope="module")
def lab(module_netns: NetnsFactory, module_run_dir: Path) -> Iterator[Lab]:
    host, inet = module_netns("host"), module_netns("inet")
    host.veth_to(inet, "up0", "eth0")
    host.run("ip", "addr", "add", f"{HOST_UPLINK}/24", "dev", "up0")
    inet.run("ip", "addr", "add", f"{INET}/24", "dev", "eth0")
    networks = {
        "a": define_network("a", "nat", subnet="10.77.10.0/24"),
        "b": define_network("b", "nat", subnet="10.77.11.0/24"),
        "int": define_network("int", "internal", subnet="10.77.12.0/24"),
        "priv": define_network("priv", "private", subnet="10.77.13.0/24"),
    }
    lab = Lab(host, inet, module_run_dir, networks)
    for net in networks.values():
        host.call(ensure_network, net, module_run_dir)
    for index, (name, network) in enumerate(
        [("a1", "a"), ("b1", "b"), ("i1", "int"), ("p1", "priv"), ("p2", "priv")]
    ):
        ns = module_netns(name)
        tap = "vh-t" + random_token(11)
        mac = f"52:54:00:bb:00:{index:02x}"
        host.veth_to(ns, tap, "eth0")
        ns.run("ip", "link", "set", "eth0", "address", mac)
        host.call(attach_to_bridge, tap, networks[network].bridge)
        host.call(set_link_up, tap)
        lab.vms[name] = Vm(ns, tap, mac)
    lab.firewall()
    for vm in lab.vms.values():
        vm.lease = dhcp(vm.ns, module_run_dir)
        vm.ip = IPv4Address(vm.lease.split()[1])
    lab.firewall()
    yield lab


def test_every_vm_gets_a_lease_in_its_subnet(lab: Lab) -> None:
    for name, prefix in (("a1", "10.77.10."), ("b1", "10.77.11."), ("i1", "10.77.12.")):
        assert str(lab.vms[name].ip).startswith(prefix)
    assert str(lab.vms["p1"].ip).startswith("10.77.13.")
    assert lab.vms["a1"].lease.endswith("router 10.77.10.1")
    # Only nat networks offer a router.
    assert lab.vms["i1"].lease.endswith("router none")
    assert lab.vms["p1"].lease.endswith("router none")


def test_nat_networks_are_isolated_from_each_other(lab: Lab) -> None:
    a1, b1 = lab.vms["a1"], lab.vms["b1"]
    assert a1.ns.ping(INET)  # both can go out ...
    assert b1.ns.ping(INET)
    assert not a1.ns.ping(b1.ip)  # ... but not to each other
    assert not b1.ns.ping(a1.ip)
    lab.host.call(remove_firewall)  # the control experiment: routing alone would connect them
    try:
        assert a1.ns.ping(b1.ip)
    finally:
        lab.firewall()
    assert not a1.ns.ping(b1.ip)
    a1.ns.run("ip", "route", "add", "10.77.12.0/24", "via", "10.77.10.1")
    try:
        assert not a1.ns.ping(lab.vms["i1"].ip)
    finally:
        a1.ns.run("ip", "route", "del", "10.77.12.0/24")


def test_internal_network_reaches_the_host_only(lab: Lab) -> None:
    i1 = lab.vms["i1"]
    assert lab.host.ping(i1.ip)
    assert i1.ns.ping("10.77.12.1")
    i1.ns.run("ip", "route", "add", "default", "via", "10.77.12.1")
    try:
        assert i1.ns.ping(HOST_UPLINK)  # a host address: input, not forwarding
        assert not i1.ns.ping(INET)
    finally:
        i1.ns.run("ip", "route", "del", "default")


def test_private_network_has_no_host_presence(lab: Lab) -> None:
    bridge = lab.networks["priv"].bridge
    assert "inet " not in lab.host.run("ip", "-4", "addr", "show", "dev", bridge).stdout
    assert lab.host.sysctl(f"net/ipv4/conf/{bridge}/arp_ignore") == "8"
    assert "10.77.13." not in lab.host.run("ip", "-4", "route").stdout
    p1 = lab.vms["p1"]
    assert not lab.host.ping(p1.ip)
    # Even a route forced onto the bridge does not let the host through.
    lab.host.run("ip", "route", "add", "10.77.13.0/24", "dev", bridge)
    try:
        assert not lab.host.ping(p1.ip)
    finally:
        lab.host.run("ip", "route", "del", "10.77.13.0/24", "dev", bridge)
    p1.ns.run("ip", "route", "add", "default", "dev", "eth0")
    try:
        assert not p1.ns.ping(HOST_UPLINK)
    finally:
        p1.ns.run("ip", "route", "del", "default", "dev", "eth0")


def test_private_vms_reach_each_other(lab: Lab) -> None:
    p1, p2 = lab.vms["p1"], lab.vms["p2"]
    assert p1.ns.ping(p2.ip)
    server = start_tcp_server(p2.ns, 9000, "p2")
    try:
        assert tcp_request(p1.ns, str(p2.ip), 9000) == f"p2 {p1.ip}"
    finally:
        server.kill()
        server.wait()


def test_private_dhcp_server_lives_in_its_own_namespace(lab: Lab) -> None:
    net = lab.networks["priv"]
    pid = lab.host.call(find_dnsmasq, dnsmasq_paths(net, lab.run_dir))
    assert pid is not None
    host_ns = lab.host.run("readlink", "/proc/self/ns/net").stdout.strip()
    assert os.readlink(f"/proc/{pid}/ns/net") != host_ns
    veth = lab.host.call(get_link, dhcp_veth_name(net.bridge))
    assert veth is not None and veth.master == net.bridge


def test_private_dhcp_server_comes_back_after_a_crash(lab: Lab) -> None:
    net = lab.networks["priv"]
    paths = dnsmasq_paths(net, lab.run_dir)
    pid = lab.host.call(find_dnsmasq, paths)
    lab.host.restart_worker()
    assert lab.host.call(ensure_network, net, lab.run_dir).dnsmasq_pid == pid  # adopted

    os.kill(pid, signal.SIGKILL)
    veth = dhcp_veth_name(net.bridge)
    wait_until(lambda: lab.host.call(get_link, veth) is None, 10, "the DHCP veth to go")
    new_pid = lab.host.call(ensure_network, net, lab.run_dir).dnsmasq_pid
    assert new_pid not in (None, pid)
    p2 = lab.vms["p2"]
    assert dhcp(p2.ns, lab.run_dir).split()[1] == str(p2.ip)


def test_removal_leaves_nothing(lab: Lab) -> None:
    for vm in lab.vms.values():
        lab.host.call(remove_tap, vm.tap)
    for net in lab.networks.values():
        lab.host.call(remove_network, net, lab.run_dir)
    lab.host.call(remove_firewall)
    inventory = lab.host.call(scan_host, lab.run_dir)
    assert inventory.empty, inventory
    assert inventory.dnsmasq == ()
    assert processes_with_arg_prefix(f"--conf-file={lab.run_dir}/") == []
