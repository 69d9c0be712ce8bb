"""A nat network for real, in namespaces: DHCP, DNS, masquerade, port forwards, anti-spoofing.

Topology (one namespace each)::

    vm  [eth0] ---- [vh-t...] host (bridge vh-blab, 10.77.1.1/24) [up0] ---- [eth0] inet
    vm2 [eth0] ---- [vh-t...]                          198.51.100.1/24        198.51.100.2/24

The veth ends in the bridge play the VMs' TAPs. 10.77.0.0/24 is routed by the
host towards "inet", so the subnet chooser has to skip it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
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
    DhcpReservation,
    Network,
    PortForward,
    VmPort,
    apply_firewall,
    attach_to_bridge,
    choose_subnet,
    define_network,
    ensure_network,
    host_used_networks,
    network_leases,
    remove_firewall,
    remove_network,
    remove_tap,
    scan_host,
    set_link_up,
    update_reservations,
)
from vmhive.network.dnsmasq import find_dnsmasq
from vmhive.network.networks import dnsmasq_paths

pytestmark = pytest.mark.network

HOST_UPLINK = "198.51.100.1"
INET = "198.51.100.2"
VM_MAC = "52:54:00:aa:00:01"
VM2_MAC = "52:54:00:aa:00:02"


@dataclass
class NatLab:
    host: Netns
    vm: Netns
    vm2: Netns
    inet: Netns
    net: Network
    tap: str
    tap2: str
    run_dir: Path
    vm_ip: IPv4Address
    vm2_ip: IPv4Address
    forward: PortForward
    servers: list[subprocess.Popen[str]]

    @property
    def gateway(self) -> str:
        return str(self.net.gateway)

    def firewall(self, vm_ip: IPv4Address | None) -> None:
        ports = [VmPort(self.tap, VM_MAC, vm_ip), VmPort(self.tap2, VM2_MAC, self.vm2_ip)]
        self.host.call(apply_firewall, [self.net], [self.forward], ports)


def _plug(host: Netns, vm: Netns, mac: str, bridge: str) -> str:
    """Connect `vm` to `bridge` by a veth whose host end is named like a TAP."""
    tap = "vh-t" + random_token(11)
    host.veth_to(vm, tap, "eth0")
    vm.run("ip", "link", "set", "eth0", "address", mac)
    host.call(attach_to_bridge, tap, bridge)
    host.call(set_link_up, tap)
    return tap


@pytest.fixture(scope="module")
def lab(module_netns: NetnsFactory, module_run_dir: Path) -> Iterator[NatLab]:
    host, inet = module_netns("host"), module_netns("inet")
    vm, vm2 = module_netns("vm"), module_netns("vm2")
    host.veth_to(inet, "up0", "eth0")
    host.run("ip", "addr", "add", f"{HOST_UPLINK}/24", "dev", "up0")
    inet.run("ip", "addr", "add", f"{INET}/24", "dev", "eth0")
    host.run("ip", "route", "add", "10.77.0.0/24", "via", INET)

    subnet = choose_subnet(host.call(host_used_networks))
    net = define_network("lab", "nat", subnet=subnet, domain="lab.test")
    host.call(ensure_network, net, module_run_dir)
    tap, tap2 = _plug(host, vm, VM_MAC, net.bridge), _plug(host, vm2, VM2_MAC, net.bridge)

    unknown = IPv4Address("0.0.0.0")
    forward = PortForward("lab", "tcp", 8080, IPv4Address("10.77.1.2"), 80)
    lab = NatLab(host, vm, vm2, inet, net, tap, tap2, module_run_dir, unknown, unknown, forward, [])
    try:
        # Before the VMs' addresses are known, only their MACs are enforced: DHCP must work.
        ports = [VmPort(tap, VM_MAC, None), VmPort(tap2, VM2_MAC, None)]
        host.call(apply_firewall, [net], [], ports)
        lab.vm_ip = IPv4Address(dhcp(vm, module_run_dir, hostname="vm1").split()[1])
        lab.vm2_ip = IPv4Address(dhcp(vm2, module_run_dir, hostname="vm2").split()[1])
        lab.forward = PortForward("lab", "tcp", 8080, lab.vm_ip, 80)
        lab.firewall(lab.vm_ip)
        lab.servers.append(start_tcp_server(inet, 7000, "inet"))
        lab.servers.append(start_tcp_server(vm, 80, "vm"))
        yield lab
    finally:
        for server in lab.servers:
            server.kill()
            server.wait()


def test_subnet_chooser_skips_the_hosts_routes(lab: NatLab) -> None:
    assert lab.net.subnet == IPv4Network("10.77.1.0/24")
    assert lab.net.gateway == IPv4Address("10.77.1.1")


def test_bridge_gets_gateway_and_forwarding(lab: NatLab) -> None:
    out = lab.host.run("ip", "-4", "-o", "addr", "show", "dev", lab.net.bridge).stdout
    assert "10.77.1.1/24" in out
    assert lab.host.sysctl("net/ipv4/ip_forward") == "1"
    assert lab.host.sysctl(f"net/ipv4/conf/{lab.net.bridge}/route_localnet") == "1"
    assert lab.host.sysctl(f"net/ipv6/conf/{lab.net.bridge}/disable_ipv6") == "1"


def test_dhcp_lease_with_router_and_hostname(lab: NatLab) -> None:
    assert lab.vm_ip in lab.net.subnet  # type: ignore[operator]
    routes = lab.vm.run("ip", "route").stdout
    assert f"default via {lab.gateway}" in routes
    leases = lab.host.call(network_leases, lab.net, lab.run_dir)
    assert leases[VM_MAC].ipv4 == lab.vm_ip
    assert leases[VM_MAC].hostname == "vm1"


def test_dns_answers_dhcp_client_names(lab: NatLab) -> None:
    out = lab.vm.run("busybox", "nslookup", "vm1.lab.test", lab.gateway).stdout
    assert str(lab.vm_ip) in out


def test_vm_reaches_outside_masqueraded(lab: NatLab) -> None:
    assert tcp_request(lab.vm, INET, 7000) == f"inet {HOST_UPLINK}"


def test_port_forward_from_outside_keeps_client_address(lab: NatLab) -> None:
    assert tcp_request(lab.inet, HOST_UPLINK, 8080) == f"vm {INET}"


def test_port_forward_from_the_host_itself(lab: NatLab) -> None:
    assert tcp_request(lab.host, HOST_UPLINK, 8080) == f"vm {HOST_UPLINK}"
    assert tcp_request(lab.host, lab.gateway, 8080) == f"vm {lab.gateway}"


def test_port_forward_from_localhost(lab: NatLab) -> None:
    assert tcp_request(lab.host, "127.0.0.1", 8080) == f"vm {lab.gateway}"


def test_port_forward_hairpin_from_another_vm_of_the_network(lab: NatLab) -> None:
    assert tcp_request(lab.vm2, HOST_UPLINK, 8080) == f"vm {lab.gateway}"


def test_vms_of_one_network_reach_each_other(lab: NatLab) -> None:
    assert lab.vm2.ping(lab.vm_ip)
    assert tcp_request(lab.vm2, str(lab.vm_ip), 80) == f"vm {lab.vm2_ip}"


def test_outside_cannot_open_connections_into_the_network(lab: NatLab) -> None:
    lab.inet.run("ip", "route", "replace", str(lab.net.subnet), "via", HOST_UPLINK)
    try:
        assert tcp_request(lab.inet, str(lab.vm_ip), 80) is None
        assert not lab.inet.ping(lab.vm_ip)
    finally:
        lab.inet.run("ip", "route", "del", str(lab.net.subnet))


def test_spoofed_source_address_is_dropped(lab: NatLab) -> None:
    assert lab.vm.ping(lab.gateway)
    lab.vm.run("ip", "addr", "add", "10.77.1.250/24", "dev", "eth0")
    try:
        assert not lab.vm.ping(lab.gateway, source="10.77.1.250")
        assert lab.vm.ping(lab.gateway, source=str(lab.vm_ip))
    finally:
        lab.vm.run("ip", "addr", "del", "10.77.1.250/24", "dev", "eth0")


def test_spoofed_mac_is_dropped(lab: NatLab) -> None:
    lab.vm.run("ip", "link", "set", "eth0", "address", "52:54:00:aa:00:99")
    try:
        assert not lab.vm.ping(lab.gateway)
    finally:
        lab.vm.run("ip", "link", "set", "eth0", "address", VM_MAC)
    wait_until(lambda: lab.vm.ping(lab.gateway), 10, "the VM to reach its gateway again")


def test_reservation_reloads_without_restart(lab: NatLab) -> None:
    paths = dnsmasq_paths(lab.net, lab.run_dir)
    pid = lab.host.call(find_dnsmasq, paths)
    reserved = IPv4Address("10.77.1.50")
    changed = lab.host.call(
        update_reservations, lab.net, lab.run_dir, [DhcpReservation(VM_MAC, reserved, "vm1")]
    )
    assert changed
    lab.firewall(None)  # the VM is about to change address
    try:
        lease = dhcp(lab.vm, lab.run_dir, hostname="vm1")
        assert lease.split()[1] == str(reserved)
        assert lab.host.call(find_dnsmasq, paths) == pid
        assert not lab.host.call(
            update_reservations, lab.net, lab.run_dir, [DhcpReservation(VM_MAC, reserved, "vm1")]
        )
    finally:
        lab.host.call(update_reservations, lab.net, lab.run_dir, [])
        lease = dhcp(lab.vm, lab.run_dir, hostname="vm1")
        lab.vm_ip = IPv4Address(lease.split()[1])
        lab.forward = PortForward("lab", "tcp", 8080, lab.vm_ip, 80)
        lab.firewall(lab.vm_ip)


def test_ensure_is_idempotent_and_adopts_after_restart(lab: NatLab) -> None:
    paths = dnsmasq_paths(lab.net, lab.run_dir)
    pid = lab.host.call(find_dnsmasq, paths)
    assert pid is not None
    assert lab.host.call(ensure_network, lab.net, lab.run_dir).dnsmasq_pid == pid
    lab.host.restart_worker()  # a new daemon process finds the running dnsmasq
    assert lab.host.call(ensure_network, lab.net, lab.run_dir).dnsmasq_pid == pid
    lab.firewall(lab.vm_ip)
    assert tcp_request(lab.vm, INET, 7000) == f"inet {HOST_UPLINK}"


def test_removal_leaves_nothing(lab: NatLab) -> None:
    host, run_dir = lab.host, lab.run_dir
    for tap in (lab.tap, lab.tap2):
        host.call(remove_tap, tap)  # the stand-in TAPs are veths: this removes the VMs' ends too
    host.call(remove_network, lab.net, run_dir)
    host.call(remove_firewall)
    inventory = host.call(scan_host, run_dir)
    assert inventory.empty, inventory
    assert inventory.dnsmasq == ()
    assert processes_with_arg_prefix(f"--conf-file={run_dir}/") == []
    assert "vmhive" not in host.nft_ruleset()
    # Everything is idempotent.
    host.call(remove_network, lab.net, run_dir)
    host.call(remove_firewall)
    assert host.call(remove_tap, lab.tap) is False
