"""Three nodes on one PostgreSQL database: they see each other, place VMs by
filters and weights, and any node serves the whole API by relaying requests
about a VM to the node that owns it. The tests run in order and share the
cluster (each boot under TCG costs seconds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.cluster.conftest import Cluster, Node
from tests.functional.hive import wait_for
from vmhive.services.pools import MARKER_FILE
from vmhive.store import db

pytestmark = [pytest.mark.cluster, pytest.mark.network, pytest.mark.functional]


def tiny(node: Node, name: str, *extra: str) -> None:
    node.hive.cli("vm", "create", name, "--image", "tiny", "-g", "1", "--memory", "128",
                  "--no-nic", *extra)  # fmt: skip


def owner(node: Node, vm: str) -> str:
    value: str = node.hive.vm(vm)["node"]
    return value


def in_node(node: Node, code: str, timeout: float = 60) -> str:
    """Python run inside a node's namespace (where the nodes' addresses are)."""
    result = node.ns.run(sys.executable, "-c", textwrap.dedent(code), timeout=timeout)
    return result.stdout


def test_nodes_join_and_see_each_other(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        nodes = node.hive.cli("node", "list", "-o", "json").json()
        assert {n["name"]: n["status"] for n in nodes} == {
            "n1": "online",
            "n2": "online",
            "n3": "online",
        }
        assert [n["name"] for n in nodes if n["self"]] == [node.name]
        assert {n["address"] for n in nodes} == {c.address for c in cluster.nodes.values()}


def test_a_vm_created_through_one_node_runs_on_another(cluster: Cluster) -> None:
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    tiny(n1, "c1", "--node", "n2", "--start")
    assert owner(n1, "c1") == "n2" and owner(n3, "c1") == "n2"
    assert len(n2.hive.qemu_pids()) == 1
    assert not n1.hive.qemu_pids() and not n3.hive.qemu_pids()
    n1.hive.wait_ready("c1")  # the console log, relayed from n2
    out = n3.hive.run_in_guest("c1", "echo relayed-$((6*7))")  # a websocket, relayed
    assert "relayed-42" in out
    n3.hive.cli("vm", "force-stop", "c1")
    wait_for(lambda: not n2.hive.qemu_pids(), 30, "c1's QEMU to exit on n2")
    assert n1.hive.vm("c1")["state"] == "stopped"
    names = {vm["name"]: vm["node"] for vm in n3.hive.cli("vm", "list", "-o", "json").json()}
    assert names["c1"] == "n2"


def test_anti_affinity_puts_a_group_on_different_nodes(cluster: Cluster) -> None:
    n1 = cluster["n1"]
    for name in ("g1", "g2", "g3"):
        tiny(n1, name, "--group", "web")
    assert {owner(n1, name) for name in ("g1", "g2", "g3")} == {"n1", "n2", "n3"}
    dry = n1.hive.cli("vm", "create", "g4", "--group", "web", "--dry-run", "-o", "json").json()
    assert dry["node"] is None
    assert all("anti-affinity group web" in c["reason"] for c in dry["considered"])
    refused = n1.hive.cli("vm", "create", "g4", "--group", "web", "--no-nic", check=False)
    assert refused.rc != 0 and "no node fits" in refused.err
    for name in ("g1", "g2", "g3"):
        n1.hive.cli("vm", "delete", name)


def test_a_drained_node_gets_no_new_vms(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    n2.hive.cli("node", "drain", "n1")
    try:
        dry = n1.hive.cli("vm", "create", "d1", "--dry-run", "-o", "json").json()
        assert {c["node"]: c["reason"] for c in dry["considered"]}["n1"] == "drained"
        for name in ("d1", "d2", "d3"):
            tiny(n1, name)
        assert "n1" not in {owner(n1, name) for name in ("d1", "d2", "d3")}
    finally:
        n2.hive.cli("node", "undrain", "n1")
    assert not n1.hive.cli("node", "show", "n1", "-o", "json").json()["drained"]
    for name in ("d1", "d2", "d3"):
        n1.hive.cli("vm", "delete", name)


def test_nodes_only_trust_the_cluster_secret(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    code = f"""
        import httpx
        token = {n1.hive.token!r}
        for auth in ("Bearer " + token, "Bearer not-the-secret"):
            r = httpx.get("http://{n2.address}/api/vms", headers={{"Authorization": auth}})
            print(r.status_code)
    """
    # n1's own API token is not n2's: each node has its own; nodes use the secret.
    assert in_node(n1, code).split() == ["401", "401"]


def test_browser_console_through_another_node(cluster: Cluster) -> None:
    """Log in on n1, open the VNC console of a VM running on n3: the ticket is
    issued by n3 (relayed), and the websocket is relayed by n1 to n3."""
    n1, n3 = cluster["n1"], cluster["n3"]
    tiny(n1, "v1", "--node", "n3", "--start")
    assert len(n3.hive.qemu_pids()) == 1
    code = f"""
        import asyncio, json, httpx
        from websockets.asyncio.client import connect
        base = "http://{n1.address}"
        c = httpx.Client(base_url=base, timeout=30)
        me = c.post("/api/auth/login", json={{"username": "admin",
                    "password": {cluster.admin_password()!r}}}).json()
        t = c.post("/api/vms/v1/console/ticket", json={{"kind": "vnc"}},
                   headers={{"X-CSRF-Token": me["csrf_token"]}}).json()["ticket"]
        async def greet(ticket):
            url = "ws://{n1.address}/api/vms/v1/vnc?ticket=" + ticket
            try:
                async with connect(url, subprotocols=["binary"], open_timeout=10) as ws:
                    return (await asyncio.wait_for(ws.recv(), 10))[:12].decode()
            except Exception as exc:
                return "refused"
        print(json.dumps([asyncio.run(greet(t)), asyncio.run(greet(t))]))
    """
    first, again = json.loads(in_node(n1, code).strip().splitlines()[-1])
    assert first.startswith("RFB 003.")
    assert again == "refused"  # the ticket was used up on n3
    n1.hive.cli("vm", "force-stop", "v1")


def test_a_node_back_from_the_dead_fences_a_vm_moved_away(cluster: Cluster) -> None:
    """n1 dies with a guest running; meanwhile the VM becomes n2's (as a failover
    or a migration would make it). When n1 comes back it kills that QEMU instead
    of adopting it, and a start of the VM through n1 goes to n2."""
    n1, n2 = cluster["n1"], cluster["n2"]
    tiny(n1, "f1", "--node", "n1", "--start")
    assert len(n1.hive.qemu_pids()) == 1
    n1.hive.kill_daemon()  # its guest runs on, unwatched
    engine = create_engine(db.sync_url(cluster.db_url))
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE vms SET node_id = (SELECT id FROM nodes WHERE name = 'n2') "
                 "WHERE name = 'f1'")
        )  # fmt: skip
    engine.dispose()
    n1.hive.start()
    wait_for(lambda: not n1.hive.qemu_pids(), 15, "n1 to fence f1's QEMU")
    assert "VM f1 belongs to another node now: killed its QEMU" in n1.hive.daemon_log()
    assert owner(n1, "f1") == "n2"
    n1.hive.cli("vm", "delete", "f1", "--force")
    assert not n2.hive.qemu_pids()


def start_counter(node: Node, vm: str) -> None:
    """The guest prints tick-1, tick-2, ... on its serial console, 3 a second."""
    node.hive.run_in_guest_nowait(
        vm, "(i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done) &"
    )


def uptime(node: Node, vm: str) -> float:
    return float(node.hive.run_in_guest(vm, "cat /proc/uptime").split()[-2])


def last_tick(node: Node, vm: str) -> int:
    ticks = [int(t) for t in re.findall(r"tick-(\d+)", node.hive.console_log(vm))]
    return max(ticks) if ticks else -1


def test_live_migration_moves_a_running_guest_and_back(cluster: Cluster) -> None:
    """A guest printing a counter moves n1 -> n2 (asked through n3) with its disk
    mirrored: the counter goes on without a reboot and its uptime keeps growing;
    then back to n1."""
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    tiny(n1, "m1", "--node", "n1", "--start")
    n1.hive.wait_ready("m1")
    n1.hive.run_in_guest("m1", "echo kept > /root/before.txt; sync")
    start_counter(n1, "m1")
    wait_for(lambda: last_tick(n1, "m1") >= 3, 30, "the counter on n1")
    before = uptime(n1, "m1")
    job = n3.hive.cli("vm", "migrate", "m1", "--to", "n2", "-o", "json").json()
    assert job["state"] == "succeeded" and job["result"]["node"] == "n2"
    assert job["result"]["downtime_ms"] is not None
    assert owner(n1, "m1") == "n2" and n1.hive.vm("m1")["state"] == "running"
    assert len(n2.hive.qemu_pids()) == 1 and not n1.hive.qemu_pids()
    seen = last_tick(n2, "m1")  # n2's serial log starts at the switchover
    wait_for(lambda: last_tick(n2, "m1") >= seen + 3, 30, "the counter going on on n2")
    log = n2.hive.console_log("m1")
    assert "vmhive-guest-ready" not in log and "Linux version" not in log  # no reboot
    assert uptime(n2, "m1") > before
    assert "kept" in n2.hive.run_in_guest("m1", "cat /root/before.txt")
    job = n1.hive.cli("vm", "migrate", "m1", "--to", "n1", "-o", "json").json()
    assert job["state"] == "succeeded" and owner(n2, "m1") == "n1"
    assert len(n1.hive.qemu_pids()) == 1 and not n2.hive.qemu_pids()
    seen = last_tick(n1, "m1")
    wait_for(lambda: last_tick(n1, "m1") > seen, 30, "the counter back on n1")


def _pools_seen(cluster: Cluster) -> dict[str, list[str]]:
    nodes = cluster["n1"].hive.cli("node", "list", "-o", "json").json()
    return {n["name"]: n["pools"] or [] for n in nodes}


def test_live_migration_with_a_shared_pool_moves_only_ram(cluster: Cluster) -> None:
    """A guest whose disk is in a shared pool moves n1 -> n2 -> n1 without a disk
    copy: the target opens the same file. A node that does not see the pool (its
    marker gone, as when the storage is not mounted) is skipped by placement and
    refused as a target."""
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    shared = Path(tempfile.mkdtemp(prefix="vh-san-", dir="/tmp"))  # "mounted" on every node
    try:
        n3.hive.cli("pool", "create", "san", "--path", str(shared), "--shared")
        wait_for(lambda: all("san" in p for p in _pools_seen(cluster).values()), 30,
                 "every node to see pool san")  # fmt: skip
        tiny(n1, "s1", "--node", "n1", "--pool", "san", "--start")
        vm = n1.hive.vm("s1")
        disk = Path(vm["disks"][0]["path"])
        assert disk.parent == shared / "vms" / vm["uuid"]
        n1.hive.wait_ready("s1")
        n1.hive.run_in_guest("s1", "echo kept > /root/before.txt; sync")
        start_counter(n1, "s1")
        wait_for(lambda: last_tick(n1, "s1") >= 3, 30, "the counter on n1")
        before = uptime(n1, "s1")
        running = {n.name: len(n.hive.qemu_pids()) for n in (n1, n2)}  # m1 may run on n1
        job = n2.hive.cli("vm", "migrate", "s1", "--to", "n2", "-o", "json").json()
        assert job["state"] == "succeeded" and job["result"]["disks_s"] == 0, job
        assert any("copying no disk" in line["message"] for line in job["log"])
        assert owner(n1, "s1") == "n2" and n2.hive.vm("s1")["disks"][0]["path"] == str(disk)
        assert len(n1.hive.qemu_pids()) == running["n1"] - 1
        assert len(n2.hive.qemu_pids()) == running["n2"] + 1
        assert _leftovers(n1, vm["uuid"]) == [] and disk.exists()
        seen = last_tick(n2, "s1")
        wait_for(lambda: last_tick(n2, "s1") >= seen + 3, 30, "the counter going on on n2")
        assert "vmhive-guest-ready" not in n2.hive.console_log("s1")  # no reboot
        assert uptime(n2, "s1") > before
        assert "kept" in n2.hive.run_in_guest("s1", "cat /root/before.txt")
        job = n1.hive.cli("vm", "migrate", "s1", "--to", "n1", "-o", "json").json()
        assert job["state"] == "succeeded" and owner(n1, "s1") == "n1"
        seen = last_tick(n1, "s1")
        wait_for(lambda: last_tick(n1, "s1") > seen, 30, "the counter back on n1")

        # The storage "unmounted": no node uses the pool at its next check.
        (shared / MARKER_FILE).rename(shared / "marker.away")
        try:
            wait_for(lambda: not any("san" in p for p in _pools_seen(cluster).values()), 30,
                     "the nodes to stop using pool san")  # fmt: skip
            dry = n1.hive.cli("vm", "create", "s2", "--pool", "san", "--dry-run", "-o", "json")
            verdict = dry.json()
            assert verdict["node"] is None, verdict
            assert {c["reason"] for c in verdict["considered"]} == {"lacks pool san"}
            on_n2 = n2.hive.qemu_pids()
            refused = n1.hive.cli("vm", "migrate", "s1", "--to", "n2", check=False)
            assert refused.rc != 0 and "node n2 does not see shared pool san" in refused.err
            assert owner(n1, "s1") == "n1" and n2.hive.qemu_pids() == on_n2
        finally:
            (shared / "marker.away").rename(shared / MARKER_FILE)
        n1.hive.cli("vm", "delete", "s1", "--force")
        assert not disk.parent.exists()
        n1.hive.cli("pool", "delete", "san")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_volume_of_a_local_pool_moves_with_its_vm(cluster: Cluster) -> None:
    """An attached volume of pool `local` is mirrored into that pool on the target,
    keeps its name and becomes the target's; the source's file goes."""
    n1, n2 = cluster["n1"], cluster["n2"]
    tiny(n1, "lv1", "--node", "n1")
    n1.hive.cli("volume", "create", "vmig", "--size", "16M")
    n1.hive.cli("vm", "disk", "attach", "lv1", "vmig")
    n1.hive.cli("vm", "start", "lv1")
    n1.hive.wait_ready("lv1")
    n1.hive.run_in_guest("lv1", "echo volume-data > /dev/sdb; sync")
    before = Path(n1.hive.cli("volume", "show", "vmig", "-o", "json").json()["path"])
    assert before.parent == n1.hive.data_dir / "pools" / "local"
    job = n1.hive.cli("vm", "migrate", "lv1", "--to", "n2", "-o", "json").json()
    assert job["state"] == "succeeded" and owner(n1, "lv1") == "n2", job
    volume = n2.hive.cli("volume", "show", "vmig", "-o", "json").json()
    assert (volume["node"], volume["attached_to"]) == ("n2", ["lv1"])
    assert Path(volume["path"]) == n2.hive.data_dir / "pools" / "local" / before.name
    assert Path(volume["path"]).exists() and not before.exists()
    assert n2.hive.run_in_guest("lv1", "head -c 11 /dev/sdb") == "volume-data"
    elsewhere = n1.hive.cli("volume", "delete", "vmig", check=False)
    assert elsewhere.rc != 0 and "is on node n2" in elsewhere.err
    n1.hive.cli("vm", "delete", "lv1", "--force")
    n2.hive.cli("volume", "delete", "vmig")
    assert not Path(volume["path"]).exists()


def _leftovers(node: Node, vm_uuid: str) -> list[str]:
    folder = node.hive.data_dir / "vms" / vm_uuid
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _copying(node: Node, job_id: str) -> bool:
    """The job's log shows data moving (a progress line)."""
    job = node.hive.cli("job", "show", job_id, "-o", "json").json()
    return any("MiB" in line["message"] for line in job["log"])


def _copying_guest(source: Node, vm: str, to: Node) -> tuple[str, dict[str, Any]]:
    """A new guest on `source` printing a counter, caught mid-way through a slow
    (1 MB/s) migration to `to`: its uuid and the migration job."""
    tiny(source, vm, "--node", source.name, "--start")
    source.hive.wait_ready(vm)
    start_counter(source, vm)
    job: dict[str, Any] = source.hive.cli(
        "vm", "migrate", vm, "--to", to.name, "--bandwidth", "1M", "--no-wait", "-o", "json"
    ).json()
    wait_for(lambda: _copying(source, job["id"]), 60, "the copy to start")
    return source.hive.vm(vm)["uuid"], job


def test_a_cancelled_or_failed_migration_leaves_the_source_running(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    vm_uuid = n1.hive.vm("m1")["uuid"]
    assert owner(n1, "m1") == "n1"
    # Cancel: a bandwidth cap makes the copy slow enough to cancel mid-way.
    job = n1.hive.cli("vm", "migrate", "m1", "--to", "n2", "--bandwidth", "1M",
                      "--no-wait", "-o", "json").json()  # fmt: skip
    wait_for(lambda: _copying(n1, job["id"]), 60, "the copy to start")
    n1.hive.cli("job", "cancel", job["id"])
    done = n1.hive.cli("job", "wait", job["id"], "-o", "json", check=False)
    assert n1.hive.cli("job", "show", job["id"], "-o", "json").json()["state"] == "cancelled", done
    wait_for(lambda: not n2.hive.qemu_pids(), 30, "the target QEMU to go")
    assert owner(n2, "m1") == "n1" and n1.hive.vm("m1")["state"] == "running"
    assert _leftovers(n2, vm_uuid) == []
    # The target QEMU dies mid-way.
    job = n1.hive.cli("vm", "migrate", "m1", "--to", "n2", "--bandwidth", "1M",
                      "--no-wait", "-o", "json").json()  # fmt: skip
    wait_for(lambda: _copying(n1, job["id"]), 60, "the copy to start")
    for pid in n2.hive.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    n1.hive.cli("job", "wait", job["id"], check=False)
    failed = n1.hive.cli("job", "show", job["id"], "-o", "json").json()
    assert failed["state"] == "failed" and "runs here as before" in failed["error"]
    assert owner(n2, "m1") == "n1" and n1.hive.vm("m1")["state"] == "running"
    wait_for(lambda: _leftovers(n2, vm_uuid) == [], 30, "n2 to remove the partial disk")
    seen = last_tick(n1, "m1")
    wait_for(lambda: last_tick(n1, "m1") > seen, 30, "the counter going on on n1")
    n1.hive.cli("vm", "delete", "m1", "--force")


def test_migrate_refuses_what_it_cannot_do(cluster: Cluster) -> None:
    n1 = cluster["n1"]
    tiny(n1, "r1", "--node", "n1")
    cases = [
        (("r1", "--to", "n2"), "is stopped: live migration moves a running VM"),
        (("r1", "--to", "n1"), "on node n1 already"),
        (("r1", "--to", "nowhere"), "no node named 'nowhere'"),
        (("r1", "--to", "n2", "--downtime", "0"), "downtime limit must be"),
        (("ghost", "--to", "n2"), "no VM named 'ghost'"),
    ]
    for args, message in cases:
        result = n1.hive.cli("vm", "migrate", *args, check=False)
        assert result.rc != 0 and message in result.err, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1
    n1.hive.cli("node", "drain", "n2")
    try:
        n1.hive.cli("vm", "start", "r1")
        drained = n1.hive.cli("vm", "migrate", "r1", "--to", "n2", check=False)
        assert drained.rc != 0 and "node n2 cannot take VM r1: drained" in drained.err
    finally:
        n1.hive.cli("node", "undrain", "n2")
    assert owner(n1, "r1") == "n1"
    n1.hive.cli("vm", "delete", "r1", "--force")


def test_drain_moves_every_running_vm_away(cluster: Cluster) -> None:
    n1, n3 = cluster["n1"], cluster["n3"]
    names = ("w1", "w2", "w3")
    for name in names:
        tiny(n1, name, "--node", "n3", "--start")
    for name in names:
        n1.hive.wait_ready(name)
    assert len(n3.hive.qemu_pids()) == 3
    n1.hive.cli("node", "drain", "n3")  # relayed to n3, which runs the job
    try:
        owners = {name: owner(n1, name) for name in names}
        assert set(owners.values()) <= {"n1", "n2"}, owners
        assert not n3.hive.qemu_pids()
        assert all(n1.hive.vm(name)["state"] == "running" for name in names)
        assert n1.hive.cli("node", "show", "n3", "-o", "json").json()["drained"]
    finally:
        n1.hive.cli("node", "undrain", "n3")
    for name in names:
        n1.hive.cli("vm", "delete", name, "--force")


def test_killing_the_source_daemon_mid_migration_rolls_it_back(cluster: Cluster) -> None:
    """kill -9 of the daemon driving a migration: at its restart the migration is
    rolled back (the target had not run the guest): the guest runs on the source
    only, and the target is left with nothing."""
    n1, n2 = cluster["n1"], cluster["n2"]
    vm_uuid, job = _copying_guest(n1, "k1", n2)
    n1.hive.kill_daemon()
    n1.hive.start()
    assert "migration of k1 to n2 rolled back" in n1.hive.daemon_log()
    assert n1.hive.cli("job", "show", job["id"], "-o", "json").json()["state"] == "failed"
    assert owner(n2, "k1") == "n1" and n1.hive.vm("k1")["state"] == "running"
    assert len(n1.hive.qemu_pids()) == 1
    wait_for(lambda: not n2.hive.qemu_pids(), 30, "the target QEMU to go")
    assert _leftovers(n2, vm_uuid) == []
    seen = last_tick(n1, "k1")
    wait_for(lambda: last_tick(n1, "k1") > seen, 30, "the counter going on on n1")
    job = n1.hive.cli("vm", "migrate", "k1", "--to", "n2", "-o", "json").json()  # still movable
    assert job["state"] == "succeeded" and owner(n1, "k1") == "n2"
    n1.hive.cli("vm", "delete", "k1", "--force")


def test_killing_the_target_daemon_mid_migration_leaves_it_nothing(cluster: Cluster) -> None:
    """kill -9 of the receiving daemon: the source gives up and runs the guest on;
    the target's restart kills the orphaned incoming QEMU and removes its files."""
    n1, n2 = cluster["n1"], cluster["n2"]
    vm_uuid, job = _copying_guest(n1, "t1", n2)
    n2.hive.kill_daemon()
    try:
        n1.hive.cli("job", "wait", job["id"], check=False)
        failed = n1.hive.cli("job", "show", job["id"], "-o", "json").json()
        assert failed["state"] == "failed" and "runs here as before" in failed["error"], failed
        assert owner(n1, "t1") == "n1" and n1.hive.vm("t1")["state"] == "running"
        seen = last_tick(n1, "t1")
        wait_for(lambda: last_tick(n1, "t1") > seen, 30, "the counter going on on n1")
        assert _leftovers(n2, vm_uuid)  # the half-copied disk, until n2 is back
    finally:
        n2.hive.start()
    assert "VM t1 belongs to another node now: killed its QEMU" in n2.hive.daemon_log()
    assert not n2.hive.qemu_pids() and _leftovers(n2, vm_uuid) == []
    job = n1.hive.cli("vm", "migrate", "t1", "--to", "n2", "-o", "json").json()  # still movable
    assert job["state"] == "succeeded" and owner(n1, "t1") == "n2"
    n1.hive.cli("vm", "delete", "t1", "--force")


def test_offline_move_of_a_stopped_vm(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    n1.hive.cli("vm", "create", "o1", "-g", "1", "--memory", "64", "--no-nic", "--node", "n1")
    job = n2.hive.cli("vm", "migrate", "o1", "--to", "n2", "--offline", "-o", "json").json()
    assert job["state"] == "succeeded" and owner(n1, "o1") == "n2"
    tiny(n1, "o2", "--node", "n1")
    local = n1.hive.cli("vm", "migrate", "o2", "--to", "n2", "--offline", check=False)
    assert local.rc != 0 and "offline copy of local disks is not built" in local.err
    assert owner(n1, "o2") == "n1"
    for name in ("o1", "o2"):
        n1.hive.cli("vm", "delete", name)
