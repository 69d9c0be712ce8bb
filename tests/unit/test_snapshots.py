"""Snapshots over the in-memory driver: the tree, revert, delete, schedules, recovery.

The fake driver makes real internal snapshots of the real qcow2 files (no RAM),
so what vmhive records is checked against what the images hold.
"""

from __future__ import annotations

import doctest
import json
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.fakehive import Client as BaseClient
from tests.unit.fakehive import fake_hive
from vmhive.cli import snapshots as cli_snapshots
from vmhive.services import snapshot_policy
from vmhive.services.errors import InvalidRequest
from vmhive.store.models import Snapshot


class Client(BaseClient):
    async def snapshots(self, vm: str = "web") -> dict[str, dict[str, Any]]:
        rows = (await self.call("GET", f"/api/vms/{vm}/snapshots")).json()
        return {row["name"]: row for row in rows}


@pytest.fixture
async def client(tmp_path: Path, hive_db_url: str | None) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhs", schedules=False, db_url=hive_db_url) as hive:
        yield Client(hive.http, hive.daemon, hive.driver)


BLANK = {"name": "web", "generation": 1, "memory_mib": 64, "disks": [{"size": "16M"}]}


def tags_in(path: str) -> list[str]:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True
    )
    return [s["name"] for s in json.loads(info.stdout).get("snapshots", [])]


def write_pattern(path: str, byte: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 64k", path],
        capture_output=True,
        check=True,
    )


def pattern_is(path: str, byte: int) -> bool:
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P {byte} 0 64k", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return "Pattern verification failed" not in result.stdout


def test_pure_parts_work_as_their_docstrings_say() -> None:
    for module in (snapshot_policy, cli_snapshots):
        failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__


def test_periods_and_names_are_checked() -> None:
    for bad in ("0s", "4s", "1y", "h", "367d", ""):
        with pytest.raises(InvalidRequest):
            snapshot_policy.parse_period(bad)
    for bad in ("", "-x", "a b", "x" * 64, "a/b"):
        with pytest.raises(InvalidRequest):
            snapshot_policy.check_name(bad)
    snapshot_policy.check_name("before-upgrade_1.2")


async def test_tree_revert_branch_and_delete(client: Client) -> None:
    await client.ok("POST", "/api/vms", json=BLANK)
    disk = (await client.call("GET", "/api/vms/web")).json()["disks"][0]["path"]
    write_pattern(disk, 0x11)
    first = await client.ok("POST", "/api/vms/web/snapshots", json={"name": "a"})
    assert first["result"]["pause_ms"] is None, "a stopped VM is not paused"
    write_pattern(disk, 0x22)

    await client.ok("POST", "/api/vms/web/start")
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "b", "memory": True})
    snaps = await client.snapshots()
    assert snaps["b"]["parent"] == "a" and snaps["b"]["current"] and not snaps["a"]["current"]
    assert snaps["b"]["with_memory"] and snaps["b"]["vm_state"] == "running"
    assert snaps["a"]["vm_state"] == "stopped"
    assert sorted(tags_in(disk)) == sorted(
        s.tag for s in await _rows(client) if s.name in ("a", "b")
    )

    # Revert a running VM to a disk-only snapshot: forced off, content back.
    reverted = await client.ok("POST", "/api/vms/web/snapshots/a/revert")
    assert reverted["result"]["started"] is False
    assert (await client.call("GET", "/api/vms/web")).json()["state"] == "stopped"
    assert pattern_is(disk, 0x11)

    # A new snapshot branches from a: the tree is a -> (b, c).
    write_pattern(disk, 0x33)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "c"})
    snaps = await client.snapshots()
    assert {n: s["parent"] for n, s in snaps.items()} == {"a": None, "b": "a", "c": "a"}
    assert [n for n, s in snaps.items() if s["current"]] == ["c"]

    # A snapshot with RAM resumes the VM: the driver is asked to load it.
    reverted = await client.ok("POST", "/api/vms/web/snapshots/b/revert")
    assert reverted["result"]["started"] is True
    vm = (await client.call("GET", "/api/vms/web")).json()
    assert vm["state"] == "running"
    tag_b = next(s.tag for s in await _rows(client) if s.name == "b")
    assert client.driver.loaded_snapshots[vm["uuid"]] == tag_b
    assert pattern_is(disk, 0x22)

    # Deleting the root keeps both children, now roots, revertable.
    await client.ok("DELETE", "/api/vms/web/snapshots/a")
    snaps = await client.snapshots()
    assert {n: s["parent"] for n, s in snaps.items()} == {"b": None, "c": None}
    assert len(tags_in(disk)) == 2
    await client.ok("POST", "/api/vms/web/snapshots/c/revert")
    assert pattern_is(disk, 0x33)
    await client.ok("POST", "/api/vms/web/snapshots/b/revert", json={"start": True})
    assert pattern_is(disk, 0x22)

    # Deleting the current one makes its parent current (none here: b is a root).
    await client.ok("DELETE", "/api/vms/web/snapshots/b")
    assert {n: s["current"] for n, s in (await client.snapshots()).items()} == {"c": False}

    # The VM's deletion takes its snapshot records along.
    await client.ok("DELETE", "/api/vms/web", params={"force": "true"})
    assert await _rows(client) == []


async def _rows(client: Client) -> list[Snapshot]:
    from sqlalchemy import select

    async with client.daemon.sessions() as session:
        return list(await session.scalars(select(Snapshot)))


async def test_refusals_change_nothing(client: Client) -> None:
    await client.ok("POST", "/api/vms", json=BLANK)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "a"})
    cases = [
        ("POST", "/api/vms/web/snapshots", {"name": "b", "memory": True}, 409, "not running"),
        ("POST", "/api/vms/web/snapshots", {"name": "a"}, 409, "already has a snapshot"),
        ("POST", "/api/vms/web/snapshots", {"name": "no/slash"}, 422, "invalid snapshot name"),
        ("POST", "/api/vms/nope/snapshots", {"name": "x"}, 404, "no VM named"),
        ("POST", "/api/vms/web/snapshots/zz/revert", None, 404, "no snapshot named"),
        ("DELETE", "/api/vms/web/snapshots/zz", None, 404, "no snapshot named"),
        ("PUT", "/api/vms/web/snapshot-schedules/1y", {"keep": 3}, 422, "invalid period"),
        ("PUT", "/api/vms/web/snapshot-schedules/1h", {"keep": 0}, 422, "--keep must be"),
        ("DELETE", "/api/vms/web/snapshot-schedules/1h", None, 404, "no schedule"),
        ("POST", "/api/vms/web/clone", {"name": "c", "snapshot": "zz"}, 404, "no snapshot"),
        ("POST", "/api/vms/web/clone", {"name": "c", "snapshot": "a", "linked": True}, 422, "full"),
    ]
    for method, path, body, status, message in cases:
        response = await client.call(method, path, json=body)
        assert response.status_code == status, (path, response.text)
        assert message in response.json()["detail"], response.text
    assert list(await client.snapshots()) == ["a"]
    names = [vm["name"] for vm in (await client.call("GET", "/api/vms")).json()]
    assert names == ["web"]

    # The disks changed since the snapshot: its revert is refused.
    await client.ok("POST", "/api/pools/local/volumes", json={"name": "v1", "size": "16M"})
    await client.ok("POST", "/api/vms/web/disks", json={"volume": "v1"})
    refused = await client.call("POST", "/api/vms/web/snapshots/a/revert")
    assert refused.status_code == 422 and "pool volumes" in refused.json()["detail"]


async def test_clone_from_a_snapshot(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**BLANK, "generation": 2, "memory_mib": 256})
    disk = (await client.call("GET", "/api/vms/web")).json()["disks"][0]["path"]
    write_pattern(disk, 0x44)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "a"})
    write_pattern(disk, 0x55)
    job = await client.ok("POST", "/api/vms/web/clone", json={"name": "copy", "snapshot": "a"})
    assert job["result"]["linked"] is False
    copy = (await client.call("GET", "/api/vms/copy")).json()
    assert copy["state"] == "stopped" and copy["description"] == "clone of web at snapshot a"
    assert pattern_is(copy["disks"][0]["path"], 0x44) and pattern_is(disk, 0x55)
    assert tags_in(copy["disks"][0]["path"]) == [], "a clone starts without snapshots"
    assert (client.daemon.settings.vms_dir / copy["uuid"] / "OVMF_VARS.fd").exists()


async def test_schedule_takes_and_expires(client: Client) -> None:
    await client.ok("POST", "/api/vms", json=BLANK)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "manual"})
    response = await client.call(
        "PUT", "/api/vms/web/snapshot-schedules/10s", json={"keep": 2, "memory": True}
    )
    assert response.status_code == 200, response.text
    schedule = response.json()
    assert (schedule["every"], schedule["keep"], schedule["snapshots"]) == ("10s", 2, 0)
    moment = datetime.fromisoformat(schedule["next_run_at"]).replace(tzinfo=UTC)
    for _ in range(4):
        await client.daemon.schedules.run_due(now=moment)
        for job in (await client.call("GET", "/api/jobs")).json():
            await client.daemon.runner.wait(job["id"], 10)
        moment += timedelta(seconds=10)
    snaps = await client.snapshots()
    auto = sorted(n for n in snaps if n.startswith("auto-10s-"))
    assert len(auto) == 2 and "manual" in snaps, snaps
    assert all(snaps[n]["schedule"] == "10s" and not snaps[n]["with_memory"] for n in auto)
    disk = (await client.call("GET", "/api/vms/web")).json()["disks"][0]["path"]
    assert len(tags_in(disk)) == 3, "the expired ones are gone from the image too"
    listed = (await client.call("GET", "/api/vms/web/snapshot-schedules")).json()
    assert [(s["every"], s["snapshots"]) for s in listed] == [("10s", 2)]
    assert (await client.call("DELETE", "/api/vms/web/snapshot-schedules/10s")).status_code == 204
    assert all(s["schedule"] is None for s in (await client.snapshots()).values())


async def test_recovery_removes_an_interrupted_snapshot(client: Client) -> None:
    await client.ok("POST", "/api/vms", json=BLANK)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "a"})
    vm = await client.daemon.ctx.load_vm("web")
    disk = vm.disks[0].path
    # What a daemon killed in the middle of a snapshot leaves: the row and the tag.
    snap_id = await client.daemon.snapshots.reserve(vm, "b", memory=False)
    tag = next(s.tag for s in await _rows(client) if s.id == snap_id)
    subprocess.run(["qemu-img", "snapshot", "-c", tag, disk], check=True)
    await client.daemon.snapshots.recover()
    assert list(await client.snapshots()) == ["a"]
    assert len(tags_in(disk)) == 1


async def test_recovery_rolls_reverts_and_deletions_forward(client: Client) -> None:
    from sqlalchemy import update

    await client.ok("POST", "/api/vms", json=BLANK)
    disk = (await client.call("GET", "/api/vms/web")).json()["disks"][0]["path"]
    write_pattern(disk, 0x11)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "a"})
    write_pattern(disk, 0x22)
    await client.ok("POST", "/api/vms/web/snapshots", json={"name": "b"})
    write_pattern(disk, 0x33)
    # What a daemon killed in the middle of a revert to a, and of deleting b, leaves.
    async with client.daemon.sessions() as session:
        for name, status in (("a", "reverting"), ("b", "deleting")):
            await session.execute(
                update(Snapshot).where(Snapshot.name == name).values(status=status)
            )
        await session.commit()
    await client.daemon.snapshots.recover()
    snaps = await client.snapshots()
    assert list(snaps) == ["a"] and snaps["a"]["status"] == "ready" and snaps["a"]["current"]
    assert tags_in(disk) == [snaps["a"]["tag"]]
    assert pattern_is(disk, 0x11)
