"""The API, services and jobs over the in-memory driver: fast checks of the upper layers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.fakehive import Client, fake_hive
from vmhive.hypervisor.base import ObservedState


@pytest.fixture
async def client(tmp_path: Path, hive_db_url: str | None) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhu", db_url=hive_db_url) as hive:
        yield hive


BLANK = {"name": "web", "generation": 1, "memory_mib": 64, "disks": [{"size": "16M"}]}


async def test_token_required(client: Client) -> None:
    response = await client.http.get("/api/vms", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


async def test_create_start_stop_delete(client: Client) -> None:
    job = await client.job("POST", "/api/vms", json=BLANK)
    assert job["state"] == "succeeded", job
    vm = await client.vm("web")
    assert (vm["state"], vm["desired_state"], vm["generation"]) == ("stopped", "stopped", 1)
    disk = Path(vm["disks"][0]["path"])
    assert disk.exists()

    assert (await client.job("POST", "/api/vms/web/start"))["state"] == "succeeded"
    vm = await client.vm("web")
    assert vm["state"] == "running" and vm["pid"] and vm["desired_state"] == "running"

    assert (await client.job("POST", "/api/vms/web/pause"))["state"] == "succeeded"
    assert (await client.vm("web"))["state"] == "paused"
    assert (await client.job("POST", "/api/vms/web/resume"))["state"] == "succeeded"

    assert (await client.job("POST", "/api/vms/web/stop"))["state"] == "succeeded"
    vm = await client.vm("web")
    assert (vm["state"], vm["desired_state"], vm["pid"]) == ("stopped", "stopped", None)

    assert (await client.job("DELETE", "/api/vms/web"))["state"] == "succeeded"
    assert (await client.call("GET", "/api/vms/web")).status_code == 404
    assert not disk.exists()


async def test_stop_forces_off_after_timeout(client: Client) -> None:
    client.driver.honour_powerdown = False
    await client.job("POST", "/api/vms", json={**BLANK, "start": True})
    job = await client.job("POST", "/api/vms/web/stop", params={"timeout": 0.2})
    messages = [line["message"] for line in job["log"]]
    assert "the guest did not power off in time; forcing off" in messages
    assert (await client.vm("web"))["state"] == "stopped"


async def test_failed_start_rolls_back(client: Client) -> None:
    await client.job("POST", "/api/vms", json=BLANK)
    client.driver.fail_next_start = "QEMU did not start: boom"
    job = await client.job("POST", "/api/vms/web/start")
    assert job["state"] == "failed" and "boom" in job["error"]
    vm = await client.vm("web")
    assert (vm["state"], vm["desired_state"]) == ("stopped", "stopped")


async def test_crash_is_recorded_with_reason_and_event(client: Client) -> None:
    await client.job("POST", "/api/vms", json={**BLANK, "start": True})
    uuid = (await client.vm("web"))["uuid"]
    await client.driver.crash(uuid)
    vm = await client.vm("web")
    assert vm["state"] == ObservedState.CRASHED and "SIGKILL" in vm["state_reason"]
    assert vm["desired_state"] == "running"


async def test_create_rolls_back_when_a_step_fails(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmhive.storage import qemu_img

    async def broken(*_args: Any, **_kw: Any) -> None:
        raise qemu_img.QemuImgError("qemu-img create failed: disk full")

    monkeypatch.setattr(qemu_img, "create_blank", broken)
    job = await client.job("POST", "/api/vms", json=BLANK)
    assert job["state"] == "failed" and "disk full" in job["error"]
    assert (await client.call("GET", "/api/vms/web")).status_code == 404
    assert list((client.daemon.settings.vms_dir).iterdir()) == []
    # The name is free again.
    monkeypatch.undo()
    assert (await client.job("POST", "/api/vms", json=BLANK))["state"] == "succeeded"


async def test_jobs_on_one_vm_are_serialized(client: Client) -> None:
    await client.job("POST", "/api/vms", json=BLANK)
    await client.ok("POST", "/api/vms/web/start")  # running before the two jobs race
    first = (await client.call("POST", "/api/vms/web/reboot")).json()
    second = (await client.call("POST", "/api/vms/web/pause")).json()
    assert first["state"] in ("queued", "running") and second["state"] == "queued"
    done = await client.job("GET", f"/api/jobs/{second['id']}")
    assert done["state"] == "succeeded"
    assert (await client.vm("web"))["state"] == "paused"


async def test_refusals(client: Client) -> None:
    await client.job("POST", "/api/vms", json=BLANK)
    cases = [
        ("POST", "/api/vms", {**BLANK}, 409, "already exists"),
        ("POST", "/api/vms", {**BLANK, "name": "x", "vcpus": 99}, 422, "vcpus must be"),
        ("POST", "/api/vms/web/stop", None, 409, "not running"),
        ("POST", "/api/vms/web/resume", None, 409, "not running"),
        ("PATCH", "/api/vms/web", {"memory_mib": 8}, 422, "memory must be"),
        ("GET", "/api/jobs/nope", None, 404, "no job"),
    ]
    for method, path, body, status, message in cases:
        response = await client.call(method, path, json=body)
        assert response.status_code == status, (path, response.text)
        assert message in response.json()["detail"]
    vms = (await client.call("GET", "/api/vms")).json()
    assert [vm["name"] for vm in vms] == ["web"]


async def test_volume_create_rolls_back_when_the_pool_fails(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmhive.storage.pools import DirPool, PoolError

    async def broken(*_args: Any, **_kw: Any) -> Any:
        raise PoolError("the pool's disk is full")

    monkeypatch.setattr(DirPool, "create", broken)
    job = await client.job("POST", "/api/pools/local/volumes", json={"name": "v1", "size": "16M"})
    assert job["state"] == "failed" and "disk is full" in job["error"]
    assert (await client.call("GET", "/api/volumes")).json() == []
    monkeypatch.undo()
    job = await client.job("POST", "/api/pools/local/volumes", json={"name": "v1", "size": "16M"})
    assert job["state"] == "succeeded"
    volumes = (await client.call("GET", "/api/volumes")).json()
    assert [(v["name"], v["virtual_size"]) for v in volumes] == [("v1", 16 * 1024 * 1024)]
