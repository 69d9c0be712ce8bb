"""Migrations across the cluster's own network: the link between two nodes cut
mid-migration (the source runs on, the target clears up by itself), and a
guest on a NAT network that every node provides keeping its MAC and its IP
address when it moves. The tests share one cluster (conftest.py) and a NAT
network `lan` created through n1 (so n2 and n3 set it up when a VM on it first
comes to them), and run in order.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.cluster.conftest import Cluster, Node
from tests.functional.hive import wait_for
from vmhive.network import tap_name
from vmhive.store import db

pytestmark = [pytest.mark.cluster, pytest.mark.network, pytest.mark.functional]

SUBNET = "10.77.20"  # the NAT network `lan`; the nodes' own link is 10.77.0.0/24
GATEWAY = f"{SUBNET}.1"
COUNTER = "(i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done) &"


@pytest.fixture(scope="module")
def lan(cluster: Cluster) -> Iterator[str]:
    cluster["n1"].hive.cli("network", "create", "lan", "--subnet", f"{SUBNET}.0/24")
    yield "lan"


def tiny_on_lan(node: Node, name: str, *extra: str) -> None:
    node.hive.cli("vm", "create", name, "--image", "tiny", "-g", "1", "--memory", "128",
                  "--network", "lan", "--start", *extra)  # fmt: skip


def owner(node: Node, vm: str) -> str:
    value: str = node.hive.vm(vm)["node"]
    return value


def last_tick(node: Node, vm: str) -> int:
    ticks = [int(t) for t in re.findall(r"tick-(\d+)", node.hive.console_log(vm))]
    return max(ticks) if ticks else -1


def job(node: Node, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = node.hive.cli("job", "show", job_id, "-o", "json").json()
    return found


def copying(node: Node, job_id: str) -> bool:
    """The job's log shows data moving (a progress line)."""
    return any("MiB" in line["message"] for line in job(node, job_id)["log"])


def in_node(node: Node, code: str, timeout: float = 60) -> str:
    """Python run inside a node's namespace (where the nodes' addresses are)."""
    result = node.ns.run(sys.executable, "-c", textwrap.dedent(code), timeout=timeout)
    return result.stdout


def incoming_status(cluster: Cluster, caller: Node, target: Node, job_id: str) -> int:
    """The HTTP status of the source's `status` call about a migration's target,
    made from `caller` with the cluster secret (404: the target has no such
    migration open)."""
    engine = create_engine(db.sync_url(cluster.db_url))
    with engine.begin() as conn:
        params = conn.execute(text("SELECT params FROM jobs WHERE id = :id"), {"id": job_id})
        value = params.scalar_one()
        migration_id = (json.loads(value) if isinstance(value, str) else value)["migration_id"]
        secret = conn.execute(
            text("SELECT value FROM settings WHERE key = 'cluster.secret'")
        ).scalar_one()
    engine.dispose()
    code = f"""
        import httpx
        r = httpx.post("http://{target.address}/api/internal/migrations/{migration_id}/status",
                       json={{}}, headers={{"Authorization": "Bearer {secret}"}}, timeout=10)
        print(r.status_code)
    """
    return int(in_node(caller, code).split()[-1])


def leftovers(node: Node, vm_uuid: str) -> list[str]:
    folder = node.hive.data_dir / "vms" / vm_uuid
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def taps(node: Node) -> str:
    return node.ns.run("ip", "-br", "link", "show", "type", "tun").stdout


def test_a_network_cut_mid_migration_leaves_the_source_running(cluster: Cluster, lan: str) -> None:
    """n2's link goes down while n1 copies a guest's disk to it: the job fails,
    the guest never stops on n1, and n2, which hears nothing more from n1,
    removes its QEMU, the half-copied disk and the TAP by itself. With the link
    back the migration succeeds."""
    n1, n2 = cluster["n1"], cluster["n2"]
    tiny_on_lan(n1, "x1", "--node", "n1")
    n1.hive.wait_ready("x1")
    vm_uuid = n1.hive.vm("x1")["uuid"]
    tap = tap_name(vm_uuid, 0)
    n1.hive.run_in_guest_nowait("x1", COUNTER)
    wait_for(lambda: last_tick(n1, "x1") >= 3, 30, "the counter on n1")
    started = n1.hive.cli("vm", "migrate", "x1", "--to", "n2", "--bandwidth", "1M",
                          "--no-wait", "-o", "json").json()  # fmt: skip
    job_id = started["id"]
    wait_for(lambda: copying(n1, job_id), 60, "the copy to start")
    assert len(n2.hive.qemu_pids()) == 1 and tap in taps(n2)
    assert leftovers(n2, vm_uuid) == ["migrated-disk0.qcow2"]
    n2.ns.run("ip", "link", "set", "eth0", "down")
    cut = time.monotonic()
    try:
        # n1 finds n2 unreachable and rolls back; n2 cannot hear its abort and
        # gives up on its own once n1's calls have stopped for 15 s.
        wait_for(lambda: not n2.hive.qemu_pids(), 60, "n2 to drop the incoming QEMU")
        cleaned_after = time.monotonic() - cut
        wait_for(lambda: job(n1, job_id)["state"] != "running", 150, "the migration to fail")
        failed_after = time.monotonic() - cut
    finally:
        n2.ns.run("ip", "link", "set", "eth0", "up")
    failed = job(n1, job_id)
    print(f"n2 clean {cleaned_after:.0f} s after the cut, the job ended after "
          f"{failed_after:.0f} s: {failed['error']}")  # fmt: skip
    assert failed["state"] == "failed", failed
    assert "migration failed, x1 runs here as before" in failed["error"]
    assert "node n2 unreachable" in failed["error"], failed["error"]
    # The source never stopped: same owner, same QEMU, the counter going on.
    assert owner(n1, "x1") == "n1" and n1.hive.vm("x1")["state"] == "running"
    assert len(n1.hive.qemu_pids()) == 1
    seen = last_tick(n1, "x1")
    wait_for(lambda: last_tick(n1, "x1") > seen + 2, 30, "the counter going on on n1")
    assert "answers" in n1.hive.run_in_guest("x1", "echo answers")
    # n2 has nothing left: no QEMU, disk, TAP, nor the migration itself.
    assert "no word from the source" in n2.hive.daemon_log()
    assert not n2.hive.qemu_pids()
    assert leftovers(n2, vm_uuid) == []
    assert tap not in taps(n2)
    wait_for(lambda: n1.ns.ping(n2.address.partition(":")[0]), 30, "the link back")
    assert incoming_status(cluster, n1, n2, job_id) == 404
    # With the link back, the same migration goes through.
    done = n1.hive.cli("vm", "migrate", "x1", "--to", "n2", "-o", "json").json()
    assert done["state"] == "succeeded" and owner(n1, "x1") == "n2"
    seen = last_tick(n2, "x1")
    wait_for(lambda: last_tick(n2, "x1") > seen + 2, 30, "the counter going on on n2")
    n1.hive.cli("vm", "delete", "x1", "--force")


def guest_ping(node: Node, vm: str, address: str) -> bool:
    out = node.hive.run_in_guest(vm, f"ping -c 1 -W 2 {address} >/dev/null 2>&1; echo rc=$?")
    return out.splitlines()[-1] == "rc=0"


def guest_address(node: Node, vm: str) -> tuple[str, str]:
    """The guest's own view of its NIC: (MAC, IPv4 address)."""
    out = node.hive.run_in_guest(vm, "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0")
    mac, rest = out.strip().splitlines()[-2:]
    found = re.search(r"inet (\S+)/", rest)
    assert found, out
    return mac.strip(), found.group(1)


def vm_ip(node: Node, vm: str) -> str | None:
    ip: str | None = node.hive.vm(vm)["nics"][0]["ip"]
    return ip


def test_a_guest_keeps_its_mac_and_ip_on_a_nat_network(cluster: Cluster, lan: str) -> None:
    """A guest with a DHCP address on `lan` moves n1 -> n3 (where no VM on `lan`
    ran before): the same MAC and address inside the guest, n3's gateway and
    host reach it at once, and n3's DHCP server renews the same address."""
    n1, n3 = cluster["n1"], cluster["n3"]
    tiny_on_lan(n1, "ip1", "--node", "n1")
    ip = wait_for(lambda: vm_ip(n1, "ip1"), 120, "a DHCP lease for ip1", interval=0.5)
    assert ip.startswith(f"{SUBNET}.")
    n1.hive.wait_ready("ip1")
    mac = n1.hive.vm("ip1")["nics"][0]["mac"]
    assert guest_address(n1, "ip1") == (mac, ip)
    assert guest_ping(n1, "ip1", GATEWAY)  # the guest knows n1's gateway now
    assert n1.ns.ping(ip)
    assert f"{GATEWAY}/24" not in n3.ns.run("ip", "-br", "addr").stdout  # not set up yet
    moved = n1.hive.cli("vm", "migrate", "ip1", "--to", "n3", "-o", "json").json()
    assert moved["state"] == "succeeded" and owner(n1, "ip1") == "n3"
    assert f"{GATEWAY}/24" in n3.ns.run("ip", "-br", "addr").stdout
    assert guest_address(n3, "ip1") == (mac, ip)
    assert n3.hive.vm("ip1")["nics"][0]["mac"] == mac
    assert guest_ping(n3, "ip1", GATEWAY), "the guest reaches the gateway on n3"
    assert n3.ns.ping(ip), "n3 reaches the guest"
    assert not n1.ns.ping(ip), "n1 no longer has it"
    # n3's DHCP server knows nothing of the lease until the guest renews it:
    # it then confirms the same address.
    assert vm_ip(n3, "ip1") is None and vm_ip(n1, "ip1") is None  # asked of n3
    n3.hive.run_in_guest("ip1", "kill -USR1 $(cat /run/udhcpc/eth0.pid)")
    wait_for(lambda: vm_ip(n3, "ip1") == ip, 60, "n3's DHCP server to renew ip1's lease")
    assert vm_ip(n1, "ip1") == ip
    assert guest_address(n3, "ip1") == (mac, ip)
    n1.hive.cli("vm", "delete", "ip1", "--force")


def test_a_network_deleted_through_one_node_goes_from_every_node(
    cluster: Cluster, lan: str
) -> None:
    """With no VM left on it, `lan` deleted through n2 leaves n1 and n3 too:
    their heartbeat takes the bridge and its gateway address down."""
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    assert not n1.hive.cli("vm", "list", "-o", "json").json()  # the tests above cleaned up
    assert all(f"{GATEWAY}/24" in n.ns.run("ip", "-br", "addr").stdout for n in (n1, n3))
    n2.hive.cli("network", "delete", lan)
    for node in (n1, n3):
        wait_for(lambda node=node: f"{GATEWAY}/24" not in node.ns.run("ip", "-br", "addr").stdout,
                 30, f"{node.name} to take lan down")  # fmt: skip
    assert "network lan was deleted: taking it down here" in n3.hive.daemon_log()
