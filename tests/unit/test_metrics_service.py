"""MetricsService in a whole daemon over the fake driver: API answers, /metrics,
persistence, VM deletion and restart. Ticks are driven by hand with chosen times;
the fake's counters are moved forward by the same amount."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.fakehive import Client, fake_hive
from vmhive.metrics.service import MetricsService

VM = {"name": "web", "generation": 1, "vcpus": 2, "memory_mib": 64, "disks": [{"size": "16M"}]}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhm") as hive:
        await hive.daemon.metrics.stop()  # no background ticks: the tests tick by hand
        yield hive


def advance(client: Client, seconds: float) -> None:
    """Make every fake VM look `seconds` older, as if that much time had passed."""
    for uuid, (pid, started_at) in client.driver.stats_base.items():
        client.driver.stats_base[uuid] = (pid, started_at - seconds)


async def run_ticks(client: Client, start: float, count: int, every: float = 5.0) -> None:
    for i in range(count):
        if i:
            advance(client, every)
        await client.daemon.metrics.tick(now=start + i * every)


async def series(client: Client, path: str, range_name: str = "hour") -> dict[str, Any]:
    response = await client.call("GET", path, params={"range": range_name})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    assert all(len(v) == len(data["timestamps"]) for v in data["series"].values())
    return data


def at(data: dict[str, Any], t: float) -> dict[str, Any]:
    """The values of every series at the bucket holding time t."""
    index = data["timestamps"].index(int(t // data["step"]) * data["step"])
    return {name: values[index] for name, values in data["series"].items()}


async def test_vm_series_hour_and_day(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**VM, "start": True})
    t0 = (time.time() // 60 - 1) * 60  # the start of the last full minute
    await run_ticks(client, t0, 3)

    hour = await series(client, "/api/vms/web/metrics")
    assert (hour["range"], hour["step"], len(hour["timestamps"])) == ("hour", 5, 720)
    first, second, third = at(hour, t0), at(hour, t0 + 5), at(hour, t0 + 10)
    assert first["cpu_percent"] is None  # a rate needs two samples
    assert first["memory_bytes"] == 32 << 20
    # The fake: a quarter of each vCPU, 1 MiB/s read and 64 KiB/s written per disk.
    for row in (second, third):
        assert row["cpu_percent"] == pytest.approx(25.0, rel=0.01)
        assert row["disk_read_bps"] == pytest.approx(1 << 20, rel=0.01)
        assert row["disk_write_bps"] == pytest.approx(1 << 16, rel=0.01)
        assert row["disk_read_iops"] == pytest.approx(64, rel=0.01)
    assert set(hour["series"]) == {
        "cpu_percent", "memory_bytes", "disk_read_bps", "disk_write_bps",
        "disk_read_iops", "disk_write_iops", "net_rx_bps", "net_tx_bps",
    }  # fmt: skip
    assert at(hour, t0 - 5)["memory_bytes"] is None  # before the VM ran: a gap

    day = await series(client, "/api/vms/web/metrics", "day")
    assert (day["step"], len(day["timestamps"])) == (60, 1440)
    minute = at(day, t0)
    assert minute["cpu_percent"] == pytest.approx(25.0, rel=0.01)  # the mean of the 2 rates
    assert minute["memory_bytes"] == 32 << 20
    week = await series(client, "/api/vms/web/metrics", "week")
    assert (week["step"], len(week["timestamps"])) == (600, 1008)


async def test_host_series_and_current(client: Client) -> None:
    # CPU use is a ratio of /proc/stat's 10 ms ticks since the previous sample
    # (the daemon's first): make some pass, busily.
    spin_until = time.perf_counter() + 0.05
    while time.perf_counter() < spin_until:
        pass
    await client.daemon.metrics.tick()
    data = await series(client, "/api/host/metrics")
    current = data["current"]
    assert current["memory_total_bytes"] > current["memory_used_bytes"] > 0
    assert current["storage_total_bytes"] > current["storage_used_bytes"] > 0
    assert current["cpus"] >= 1 and 0 <= current["cpu_percent"] <= 100
    latest = at(data, time.time())
    # float32 in the store: a relative precision of 6e-8.
    assert latest["memory_total_bytes"] == pytest.approx(current["memory_total_bytes"], rel=1e-7)
    assert set(data["series"]) == {
        "cpu_percent", "memory_used_bytes", "memory_total_bytes",
        "storage_used_bytes", "storage_total_bytes",
    }  # fmt: skip


async def test_bad_range_and_unknown_vm(client: Client) -> None:
    await client.ok("POST", "/api/vms", json=VM)
    response = await client.call("GET", "/api/vms/web/metrics", params={"range": "year"})
    assert response.status_code == 400
    assert response.json()["detail"] == "range must be one of hour, day, week, got 'year'"
    response = await client.call("GET", "/api/host/metrics", params={"range": ""})
    assert response.status_code == 400
    response = await client.call("GET", "/api/vms/nope/metrics")
    assert response.status_code == 404 and "nope" in response.json()["detail"]
    # A VM that never ran has a full window of gaps.
    data = await series(client, "/api/vms/web/metrics")
    assert len(data["timestamps"]) == 720
    assert all(v is None for values in data["series"].values() for v in values)


async def test_prometheus_endpoint(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**VM, "start": True})
    await client.ok("POST", "/api/vms", json={**VM, "name": "db"})
    await client.daemon.metrics.tick()
    response = await client.call("GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text
    uuid = (await client.vm("web"))["uuid"]
    assert f'vmhive_vm_cpu_seconds_total{{vm="web",uuid="{uuid}"}}' in text
    assert f'vmhive_vm_disk_read_bytes_total{{vm="web",uuid="{uuid}",disk="disk0"}}' in text
    assert 'vmhive_vm_running{vm="db",' in text
    assert "vmhive_host_memory_total_bytes " in text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Over TCP, /metrics needs the API's authentication like everything else.
    response = await client.http.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_history_survives_a_restart_and_goes_with_the_vm(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**VM, "start": True})
    uuid = (await client.vm("web"))["uuid"]
    t0 = (time.time() // 5 - 4) * 5
    await run_ticks(client, t0, 3)
    metrics = client.daemon.metrics
    before = metrics.vm_series(uuid, "hour", now=t0 + 10)
    await metrics.persist()
    directory = client.daemon.settings.data_dir / "metrics"
    assert {p.name for p in directory.iterdir()} == {"host.rrd", f"{uuid}.rrd"}

    # A new service (the next daemon) reads it back.
    daemon = client.daemon
    again = MetricsService(daemon.settings, daemon.sessions, daemon.driver)
    await again.start()
    await again.stop()
    assert again.vm_series(uuid, "hour", now=t0 + 10) == before

    await client.ok("DELETE", "/api/vms/web", params={"force": "true"})
    await metrics.tick()
    assert uuid not in metrics.vms
    assert not (directory / f"{uuid}.rrd").exists()


async def test_restart_of_a_vm_is_a_gap_in_rates_not_a_spike(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**VM, "start": True})
    uuid = (await client.vm("web"))["uuid"]
    t0 = (time.time() // 5 - 10) * 5
    await run_ticks(client, t0, 2)
    await client.ok("POST", "/api/vms/web/force-stop")
    await client.daemon.metrics.tick(now=t0 + 10)  # stopped: no sample
    await client.ok("POST", "/api/vms/web/start")
    await client.daemon.metrics.tick(now=t0 + 15)
    advance(client, 5)
    await client.daemon.metrics.tick(now=t0 + 20)
    cpu = client.daemon.metrics.vm_series(uuid, "hour", now=t0 + 20)["series"]["cpu_percent"]
    assert cpu[-5:] == [
        None,
        pytest.approx(25.0, rel=0.01),
        None,
        None,
        pytest.approx(25.0, rel=0.01),
    ]


async def test_one_failing_vm_does_not_cost_the_others_their_sample(client: Client) -> None:
    await client.ok("POST", "/api/vms", json={**VM, "start": True})
    await client.ok("POST", "/api/vms", json={**VM, "name": "db", "start": True})
    bad = (await client.vm("db"))["uuid"]
    real_stats = client.driver.stats

    async def flaky(vm_uuid: str) -> Any:
        if vm_uuid == bad:
            raise RuntimeError("monitor gone")
        return await real_stats(vm_uuid)

    client.driver.stats = flaky  # type: ignore[method-assign]
    tick = await client.daemon.metrics.tick()
    good = (await client.vm("web"))["uuid"]
    assert set(tick.vms) == {good}
    assert not math.isnan(tick.vms[good][1])
    text = client.daemon.metrics.prometheus_text()
    assert 'vmhive_vm_running{vm="db",' in text and f'vm="db",uuid="{bad}"}} 1' in text
