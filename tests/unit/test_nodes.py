"""Nodes over the in-memory driver: registration, heartbeat, drain, removal, placement
through the API, and that a daemon only watches and runs the VMs its node owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.unit.fakehive import Client, fake_hive
from vmhive.store.models import Job, Node, Vm, utcnow

VM = {"name": "n1", "generation": 1, "memory_mib": 64, "nic": False}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhn") as hive:
        yield hive


async def add_node(api: Client, name: str, *, alive: bool = True, memory: int = 65536) -> int:
    """Another node's row, as its own daemon would have written it."""
    age = timedelta(seconds=1 if alive else 3600)
    async with api.daemon.sessions() as session:
        node = Node(
            name=name,
            address=f"{name}:8006",
            cpus=8,
            memory_mib=memory,
            storage_bytes=1 << 40,
            storage_free_bytes=1 << 40,
            heartbeat_at=utcnow() - age,
        )
        session.add(node)
        await session.commit()
        return node.id


async def test_the_daemon_registers_its_node_and_owns_its_vms(api: Client) -> None:
    nodes = (await api.call("GET", "/api/nodes")).json()
    assert len(nodes) == 1 and nodes[0]["self"] and nodes[0]["status"] == "online"
    assert nodes[0]["incarnation"] == 1 and nodes[0]["cpus"] >= 1
    await api.ok("POST", "/api/vms", json=VM)
    assert (await api.vm("n1"))["node"] == nodes[0]["name"]
    before = nodes[0]["heartbeat_at"]
    await api.daemon.nodes.heartbeat()
    assert (await api.call("GET", f"/api/nodes/{nodes[0]['name']}")).json()["heartbeat_at"] > before


async def test_drain_undrain_and_remove(api: Client) -> None:
    me = api.daemon.nodes.name
    await api.ok("POST", f"/api/nodes/{me}/drain")  # a job: nothing runs here to move
    assert (await api.call("GET", f"/api/nodes/{me}")).json()["drained"] is True
    assert (await api.call("POST", f"/api/nodes/{me}/undrain")).json()["drained"] is False
    assert (await api.call("POST", "/api/nodes/ghost/drain")).status_code == 404
    itself = await api.call("DELETE", f"/api/nodes/{me}")
    assert itself.status_code == 409 and "this daemon" in itself.json()["detail"]
    await add_node(api, "live")
    live = await api.call("DELETE", "/api/nodes/live")
    assert live.status_code == 409 and "online" in live.json()["detail"]
    dead_id = await add_node(api, "dead", alive=False)
    async with api.daemon.sessions() as session:
        await session.execute(update(Vm).values(node_id=dead_id))
        session.add(Vm(uuid="u-1", name="orphan", generation=1, vcpus=1, memory_mib=64,
                       machine="pc", node_id=dead_id, state="stopped"))  # fmt: skip
        await session.commit()
    owns = await api.call("DELETE", "/api/nodes/dead")
    assert owns.status_code == 409 and "owns 1 VMs" in owns.json()["detail"]
    async with api.daemon.sessions() as session:
        await session.execute(update(Vm).where(Vm.name == "orphan").values(node_id=None))
        await session.commit()
    assert (await api.call("DELETE", "/api/nodes/dead")).status_code == 204
    names = [n["name"] for n in (await api.call("GET", "/api/nodes")).json()]
    assert "dead" not in names and me in names


async def test_placement_explains_and_create_respects_it(api: Client) -> None:
    me = api.daemon.nodes.name
    await add_node(api, "zz-big", memory=1 << 20)
    await add_node(api, "dead", alive=False)
    verdict = (await api.call("POST", "/api/placement", json={"memory_mib": 1024})).json()
    assert verdict["node"] == "zz-big"  # spread: the most free memory
    reasons = {c["node"]: c["reason"] for c in verdict["considered"]}
    assert reasons["dead"] == "offline (no heartbeat)"
    bad = await api.call("POST", "/api/placement", json={"strategy": "random"})
    assert bad.status_code == 422
    # Creating: placement picks the other node, and the request is relayed there
    # (here nothing listens at its address, so the relay says so).
    elsewhere = await api.call("POST", "/api/vms", json=VM)
    assert elsewhere.status_code == 502
    assert "node zz-big at zz-big:8006 did not answer" in elsewhere.json()["detail"]
    assert (await api.call("GET", "/api/vms")).json() == []
    unknown = await api.call("POST", "/api/vms", json={**VM, "node": "nope"})
    assert unknown.status_code == 404
    here = await api.ok("POST", "/api/vms", json={**VM, "node": me, "affinity_group": "g1"})
    assert here["state"] == "succeeded" and (await api.vm("n1"))["node"] == me
    # Anti-affinity: the group now has a VM here, so another one may not come here.
    grouped = await api.call(
        "POST", "/api/placement", json={"affinity_group": "g1", "strategy": "pack"}
    )
    considered = {c["node"]: c for c in grouped.json()["considered"]}
    assert not considered[me]["fits"] and "g1" in considered[me]["reason"]


async def test_a_node_leaves_other_nodes_vms_alone(api: Client) -> None:
    """Two daemons on one database: recovery, autostart and the reconciler of this
    node never touch a VM another node owns."""
    other = await add_node(api, "other")
    async with api.daemon.sessions() as session:
        session.add(Vm(uuid="u-2", name="theirs", generation=1, vcpus=1, memory_mib=64,
                       machine="pc", node_id=other, state="running", desired_state="running",
                       autostart=True))  # fmt: skip
        await session.commit()
    await api.daemon.agent.reconcile_once()  # would mark a lost local VM crashed
    await api.daemon.agent.autostart()
    async with api.daemon.sessions() as session:
        vm = await session.scalar(select(Vm).where(Vm.name == "theirs"))
    assert vm is not None and vm.state == "running"
    assert not api.driver.is_running("u-2")


async def test_recovery_fails_only_this_nodes_interrupted_jobs(api: Client) -> None:
    """At start a node fails the jobs its own stop interrupted; another node's
    running job on the shared database is that node's business."""
    other = await add_node(api, "other")
    async with api.daemon.sessions() as session:
        for job_id, node_id in (("j-mine", api.daemon.nodes.id), ("j-theirs", other)):
            session.add(Job(id=job_id, kind="vm.start", state="running", node_id=node_id,
                            params={}, created_at=utcnow()))  # fmt: skip
        await session.commit()
    failed = await api.daemon.runner.recover()
    assert [job.id for job in failed] == ["j-mine"]
    assert (await api.daemon.runner.get("j-theirs")).state == "running"
    made = await api.ok("POST", "/api/vms", json={**VM, "node": api.daemon.nodes.name})
    async with api.daemon.sessions() as session:
        job = await session.get(Job, made["id"])
    assert job is not None and job.node_id == api.daemon.nodes.id


async def test_a_start_needs_ownership(api: Client) -> None:
    """A node that lost a VM (moved away while it was declared dead) never starts it."""
    other = await add_node(api, "other")
    async with api.daemon.sessions() as session:
        session.add(Vm(uuid="u-3", name="moved", generation=1, vcpus=1, memory_mib=64,
                       machine="pc", node_id=other, state="stopped"))  # fmt: skip
        await session.commit()
    job_id = await api.daemon.lifecycle.start("moved")  # as a stale node would
    await api.daemon.runner.wait(job_id, 10)
    job = await api.daemon.runner.get(job_id)
    assert job.state == "failed" and "belongs to another node" in (job.error or "")
    assert not api.driver.is_running("u-3")


async def test_placement_reads_usage_again_after_a_change_here(api: Client) -> None:
    """Placement decides on usage at most USAGE_MAX_AGE old, and on fresh usage
    right after a VM was created here (so an anti-affinity group holds)."""
    me = api.daemon.nodes.name
    await add_node(api, "other")
    group = {"affinity_group": "g", "strategy": "pack"}
    first = (await api.call("POST", "/api/placement", json=group)).json()
    assert first["node"] is not None
    await api.ok("POST", "/api/vms", json={**VM, "node": me, "affinity_group": "g"})
    after = (await api.call("POST", "/api/placement", json=group)).json()
    assert after["node"] == "other"  # this node has a VM of the group now
    await add_node(api, "zz-late")  # another node's change: seen once the usage is old
    api.daemon.nodes.forget_usage()
    names = {
        c["node"] for c in (await api.call("POST", "/api/placement", json={})).json()["considered"]
    }
    assert "zz-late" in names
