"""Three nodes on one PostgreSQL database: they see each other, place VMs by
filters and weights, and any node serves the whole API by relaying requests
about a VM to the node that owns it. The tests run in order and share the
cluster (each boot under TCG costs seconds)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from sqlalchemy import create_engine, text

from tests.cluster.conftest import Cluster, Node
from tests.functional.hive import wait_for
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
