"""Virtual switches end to end: a real `vmhive serve` inside a network namespace,
driven by the real CLI, with tiny guests getting DHCP leases on real bridges.

The daemon runs under `ip netns exec`, so its bridges, TAPs, nftables tables,
dnsmasq processes and QEMUs live in the namespace, which plays the host;
nothing touches the real host's interfaces. The tests share one daemon and
run in order, each building on what the previous one left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.hive import Hive, wait_for
from tests.network.conftest import NetnsFactory
from tests.network.helpers import Netns, kill_and_wait, processes_with_arg_prefix
from vmhive.config import Settings
from vmhive.network import tap_name

pytestmark = [pytest.mark.network, pytest.mark.functional]

LEASE_DEADLINE = 120.0


@pytest.fixture(scope="module")
def host(module_netns: NetnsFactory) -> Netns:
    return module_netns("host")


@pytest.fixture(scope="module")
def hive(host: Netns, tiny_image_dir: Path) -> Iterator[Hive]:
    h = Hive(tiny_image_dir, netns=host.name)
    run_dir = net_run_dir(h)
    h.start()
    try:
        yield h
    finally:
        h.close()
        # A private network's dnsmasq lives in a namespace of its own, which
        # deleting the host namespace does not reach.
        for pid in processes_with_arg_prefix(f"--conf-file={run_dir}/"):
            kill_and_wait(pid)
        shutil.rmtree(run_dir, ignore_errors=True)


def net_run_dir(hive: Hive) -> Path:
    return Settings(data_dir=hive.data_dir).net_run_dir


def lease_of(hive: Hive, vm: str, nic: int = 0) -> str:
    def leased() -> str | None:
        ip: str | None = hive.vm(vm)["nics"][nic]["ip"]
        return ip

    try:
        return str(wait_for(leased, LEASE_DEADLINE, f"a DHCP lease for {vm}", interval=0.5))
    except TimeoutError:
        raise AssertionError(
            f"{vm} got no lease; console:\n{hive.console_log(vm)[-2000:]}"
        ) from None


def guest_ping(hive: Hive, vm: str, address: str, source: str | None = None) -> bool:
    flags = f"-I {source} " if source else ""
    out = hive.run_in_guest(vm, f"ping -c 1 -W 2 {flags}{address} >/dev/null 2>&1; echo rc=$?")
    return out.splitlines()[-1] == "rc=0"


def tiny(hive: Hive, name: str, *extra: str) -> None:
    hive.cli("vm", "create", name, "--image", "tiny", "-g", "1", "--memory", "128",
             "--start", *extra)  # fmt: skip


def dnsmasq_pids(hive: Hive) -> set[int]:
    return set(processes_with_arg_prefix(f"--conf-file={net_run_dir(hive)}/"))


def test_nat_network_leases_and_reachability(hive: Hive, host: Netns) -> None:
    networks = {n["name"]: n for n in hive.cli("network", "list", "-o", "json").json()}
    assert networks["default"]["type"] == "nat", "a nat network 'default' after first start"
    hive.cli("network", "create", "lab", "--subnet", "10.77.10.0/24")
    lab = hive.cli("network", "show", "lab", "-o", "json").json()
    assert lab["gateway"] == "10.77.10.1" and lab["bridge"].startswith("vh-b")
    assert "10.77.10.1/24" in host.run("ip", "-br", "addr", "show", lab["bridge"]).stdout

    tiny(hive, "a1", "--network", "lab")
    tiny(hive, "a2", "--network", "lab", "--ip", "10.77.10.50")
    a1 = lease_of(hive, "a1")
    assert re.fullmatch(r"10\.77\.10\.\d+", a1) and a1 != "10.77.10.50"
    assert lease_of(hive, "a2") == "10.77.10.50", "the reservation is what DHCP hands out"
    hive.wait_ready("a1")
    hive.wait_ready("a2")
    assert guest_ping(hive, "a1", "10.77.10.1"), "a guest reaches its gateway"
    assert guest_ping(hive, "a1", "10.77.10.50"), "two VMs on one network reach each other"
    assert host.ping(a1), "the host reaches a VM on a nat network"
    shown = hive.cli("network", "show", "lab", "-o", "json").json()
    assert {(p["vm"], p["ip"]) for p in shown["ports"]} == {("a1", a1), ("a2", "10.77.10.50")}

    busy = hive.cli("network", "delete", "lab", check=False)
    assert busy.rc == 1 and "in use by VM(s) a1, a2" in busy.err
    dup = hive.cli("network", "create", "clash", "--subnet", "10.77.10.128/25", check=False)
    assert dup.rc == 1 and "overlaps" in dup.err
    taken = hive.cli("vm", "create", "a3", "--network", "lab", "--ip", "10.77.10.50", check=False)
    assert taken.rc == 1 and "already reserved" in taken.err


def test_networks_are_isolated_from_each_other(hive: Hive, host: Netns) -> None:
    hive.cli("network", "create", "lab2", "--subnet", "10.77.11.0/24")
    tiny(hive, "b1", "--network", "lab2", "--ip", "10.77.11.20")
    assert lease_of(hive, "b1") == "10.77.11.20"
    hive.wait_ready("b1")
    assert guest_ping(hive, "b1", "10.77.11.1")
    assert not guest_ping(hive, "b1", "10.77.10.50"), "lab2 must not reach lab"
    assert not guest_ping(hive, "a2", "10.77.11.20"), "lab must not reach lab2"


def test_private_network_is_invisible_to_the_host(hive: Hive, host: Netns) -> None:
    hive.cli("network", "create", "priv", "--type", "private", "--subnet", "10.77.12.0/24")
    bridge = hive.cli("network", "show", "priv", "-o", "json").json()["bridge"]
    assert "inet " not in host.run("ip", "-4", "addr", "show", bridge).stdout
    tiny(hive, "p1", "--network", "priv")
    p1 = lease_of(hive, "p1")
    hive.wait_ready("p1")
    assert not host.ping(p1), "the host has no way into a private network"
    assert not guest_ping(hive, "p1", "10.77.10.1"), "nor the VM out of it"


def test_port_forward_from_the_host_and_localhost(hive: Hive, host: Netns) -> None:
    a1 = lease_of(hive, "a1")
    hive.run_in_guest("a1", "mkdir -p /tmp/www && echo hello-from-a1 > /tmp/www/index.html")
    hive.run_in_guest("a1", "httpd -p 8080 -h /tmp/www")
    hive.cli("network", "forward", "add", "lab", "--host-port", "18080", "--vm", "a1",
             "--vm-port", "8080")  # fmt: skip
    forwards = hive.cli("network", "forward", "list", "lab", "-o", "json").json()
    assert forwards == [
        {"proto": "tcp", "host_port": 18080, "vm": "a1", "nic": 0, "vm_port": 8080, "vm_ip": a1}
    ]

    def fetch(url: str) -> str:  # (busybox-static's wget crashes on this host)
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return host.run(sys.executable, "-c", code, check=False).stdout

    assert wait_for(lambda: "hello-from-a1" in fetch("http://127.0.0.1:18080/"), 30,
                    "the forward from localhost")  # fmt: skip
    assert "hello-from-a1" in fetch("http://10.77.10.1:18080/")
    dup = hive.cli("network", "forward", "add", "lab", "--host-port", "18080", "--vm", "a2",
                   "--vm-port", "80", check=False)  # fmt: skip
    assert dup.rc == 1 and "already forwarded" in dup.err
    wrong = hive.cli("network", "forward", "add", "priv", "--host-port", "18081", "--vm", "p1",
                     "--vm-port", "80", check=False)  # fmt: skip
    assert wrong.rc == 1 and "need a nat network" in wrong.err
    hive.cli("network", "forward", "remove", "lab", "--host-port", "18080")
    assert "hello-from-a1" not in fetch("http://127.0.0.1:18080/")


def test_spoofed_source_address_is_dropped(hive: Hive) -> None:
    assert guest_ping(hive, "a2", "10.77.10.1")
    hive.run_in_guest("a2", "ip addr add 10.77.10.99/24 dev eth0")
    assert not guest_ping(hive, "a2", "10.77.10.1", source="10.77.10.99")
    hive.run_in_guest("a2", "ip addr del 10.77.10.99/24 dev eth0")
    assert guest_ping(hive, "a2", "10.77.10.1")


def test_nic_hotplug_unplug_and_link_state(hive: Hive) -> None:
    hive.cli("vm", "create", "c1", "--image", "tiny", "-g", "2", "--memory", "256",
             "--network", "lab", "--start")  # fmt: skip
    hive.wait_ready("c1")
    links = "ls /sys/class/net | grep -v lo | wc -l"
    assert hive.run_in_guest("c1", links) == "1"
    added = hive.cli("vm", "nic", "add", "c1", "--network", "lab2", "-o", "json").json()
    assert added["result"]["nic"] == 1
    wait_for(lambda: hive.run_in_guest("c1", links) == "2", 30, "the hot-plugged NIC")
    nics = hive.cli("vm", "nic", "list", "c1", "-o", "json").json()
    assert [(n["network"], n["backend"]) for n in nics] == [("lab", "tap"), ("lab2", "tap")]

    hive.cli("vm", "nic", "link", "c1", "0", "down")
    assert hive.run_in_guest("c1", "cat /sys/class/net/eth0/carrier") == "0"
    hive.cli("vm", "nic", "link", "c1", "0", "up")
    assert hive.run_in_guest("c1", "cat /sys/class/net/eth0/carrier") == "1"

    hive.cli("vm", "nic", "remove", "c1", "1")
    wait_for(lambda: hive.run_in_guest("c1", links) == "1", 30, "the NIC to go")
    gen1 = hive.cli("vm", "nic", "add", "a1", "--network", "lab2", check=False)
    assert gen1.rc == 1 and "generation 1" in gen1.err


def test_restart_keeps_traffic_and_everything_goes_away(hive: Hive, host: Netns) -> None:
    before = dnsmasq_pids(hive)
    assert len(before) >= 4  # default, lab, lab2, priv
    a1 = lease_of(hive, "a1")
    hive.kill_daemon()
    assert host.ping(a1), "guests keep their network while the daemon is down"
    hive.start()
    assert dnsmasq_pids(hive) == before, "the daemon re-adopts the DHCP servers"
    assert host.ping(a1) and guest_ping(hive, "a2", "10.77.10.1")

    # Stopping a VM takes its TAP away; starting it brings the TAP back.
    tap = tap_name(hive.vm("b1")["uuid"], 0)
    assert tap in host.run("ip", "-br", "link").stdout
    hive.cli("vm", "force-stop", "b1")
    assert tap not in host.run("ip", "-br", "link").stdout
    assert hive.cli("host", "cleanup", "--dry-run", "-o", "json").json()["taps"] == []

    # A host reboot: guests, bridges, TAPs, rules and DHCP servers all gone.
    hive.kill_daemon()
    for pid in hive.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not hive.qemu_pids(), 15, "the guests to die")
    for pid in dnsmasq_pids(hive):
        kill_and_wait(pid)
    for line in host.run("ip", "-br", "link").stdout.splitlines():
        if line.startswith("vh-"):
            host.run("ip", "link", "del", line.split()[0].split("@")[0], check=False)
    host.run("nft", "flush", "ruleset")
    shutil.rmtree(net_run_dir(hive))
    hive.start()
    lab = hive.cli("network", "show", "lab", "-o", "json").json()
    assert "10.77.10.1/24" in host.run("ip", "-br", "addr", "show", lab["bridge"]).stdout
    assert len(dnsmasq_pids(hive)) == 4 and "vmhive" in host.run("nft", "list", "tables").stdout
    hive.cli("vm", "start", "b1")
    assert lease_of(hive, "b1") == "10.77.11.20"
    hive.wait_ready("b1", count=2)
    assert guest_ping(hive, "b1", "10.77.11.1"), "the network works again after the reboot"

    host.run("ip", "link", "add", "vh-bstray", "type", "bridge")
    stray = hive.cli("host", "cleanup", "--dry-run", "-o", "json").json()
    assert stray["bridges"] == ["vh-bstray"] and stray["taps"] == []
    hive.cli("host", "cleanup")
    assert "vh-bstray" not in host.run("ip", "-br", "link").stdout

    for vm in ("a1", "a2", "b1", "p1", "c1"):
        hive.cli("vm", "delete", vm, "--force")
    for net in ("lab", "lab2", "priv", "default"):
        hive.cli("network", "delete", net)
    assert "vh-" not in host.run("ip", "-br", "link").stdout
    assert "vmhive" not in host.run("nft", "list", "tables").stdout
    assert dnsmasq_pids(hive) == set()
    assert hive.cli("host", "cleanup", "--dry-run", "-o", "json").json() == {
        "bridges": [], "taps": [], "links": [], "nft_tables": [], "dnsmasq": []
    }  # fmt: skip
