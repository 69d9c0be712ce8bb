"""Metrics of a real daemon sampling a real tiny guest every second."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.functional.hive import Hive, wait_for
from tests.network.helpers import Netns, kill_and_wait, processes_with_arg_prefix, random_token
from vmhive.config import Settings

MiB = 1 << 20


@pytest.fixture
def fast_hive(tiny_image_dir: Path) -> Iterator[Hive]:
    h = Hive(tiny_image_dir, "--metrics-interval", "1")
    h.start()
    try:
        yield h
    finally:
        h.close()


def get(hive: Hive, path: str, **params: str) -> dict[str, Any]:
    response = hive.api("GET", path, params=params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def known(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def test_metrics_of_a_running_vm(fast_hive: Hive) -> None:
    hive = fast_hive
    name = "metered"
    vm = hive.create_tiny(name, 2, "--start")
    hive.wait_ready(name)
    path = f"/api/vms/{name}/metrics"

    def enough_points() -> dict[str, Any] | None:
        data = get(hive, path, range="hour")
        return data if len(known(data["series"]["cpu_percent"])) >= 3 else None

    data = wait_for(enough_points, 60, "3 CPU points in the VM's hour series", interval=1)
    series = data["series"]
    assert data["step"] == 5 and len(data["timestamps"]) == 720
    assert max(known(series["cpu_percent"])) > 0
    assert max(known(series["disk_read_bps"])) > 0  # the guest read its disk while booting
    assert max(known(series["memory_bytes"])) > 10 * MiB
    # Without a vmhive network the NIC is on QEMU's user-mode NAT: no counters.
    assert known(series["net_rx_bps"]) == [] and known(series["net_tx_bps"]) == []
    assert any("user-mode" in note for note in data["notes"])

    host = get(hive, "/api/host/metrics", range="day")
    assert host["step"] == 60
    assert max(known(host["series"]["memory_total_bytes"])) > 0
    assert host["current"]["memory_total_bytes"] > 0 and host["current"]["cpus"] >= 1

    text = hive.api("GET", "/metrics").text
    assert re.search(
        rf'^vmhive_vm_cpu_seconds_total\{{vm="{name}",uuid="{vm["uuid"]}"\}} [0-9.e+]+$',
        text,
        re.MULTILINE,
    ), text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # Over TCP, /metrics wants the API's credentials, as Prometheus' bearer_token gives.
    url = f"http://127.0.0.1:{hive.port}/metrics"
    assert httpx.get(url, timeout=30).status_code == 401
    authorized = httpx.get(url, headers={"Authorization": f"Bearer {hive.token}"}, timeout=30)
    assert authorized.status_code == 200 and "vmhive_host_cpus" in authorized.text

    bad = hive.api("GET", path, params={"range": "month"})
    assert bad.status_code == 400 and "hour, day, week" in bad.json()["detail"]
    assert hive.api("GET", "/api/vms/no-such-vm/metrics").status_code == 404

    # The history is saved at stop and read back by the next daemon.
    hive.stop_daemon()
    assert (hive.data_dir / "metrics" / f"{vm['uuid']}.rrd").is_file()
    hive.start()
    after = get(hive, path, range="hour")["series"]["memory_bytes"]
    assert len(known(after)) >= len(known(series["memory_bytes"]))


@pytest.mark.network
def test_tap_nic_traffic_is_counted_from_the_guests_side(tiny_image_dir: Path) -> None:
    """A daemon in a namespace of its own (with its nat network 'default'): the
    guest's DHCP exchange shows as traffic both ways on its TAP NIC."""
    host = Netns(f"vhtest-metrics-{random_token()}")
    hive = Hive(tiny_image_dir, "--metrics-interval", "1", netns=host.name)
    dnsmasq_dir = Settings(data_dir=hive.data_dir).net_run_dir
    try:
        hive.start()
        name = "tapped"
        vm = hive.create_tiny(name, 1, "--start")
        assert vm["nics"][0]["network"] == "default", vm["nics"]
        wait_for(lambda: hive.vm(name)["nics"][0]["ip"], 120, "a DHCP lease", interval=0.5)

        def traffic_both_ways() -> dict[str, Any] | None:
            data = get(hive, f"/api/vms/{name}/metrics", range="hour")
            rx, tx = (known(data["series"][k]) for k in ("net_rx_bps", "net_tx_bps"))
            return data if rx and tx and max(rx) > 0 and max(tx) > 0 else None

        data = wait_for(traffic_both_ways, 30, "NIC traffic in the VM's series", interval=1)
        assert "notes" not in data
        text = hive.api("GET", "/metrics").text
        counters = {
            direction: int(match.group(1))
            for direction in ("receive", "transmit")
            if (
                match := re.search(
                    rf'^vmhive_vm_network_{direction}_packets_total\{{vm="{name}",'
                    rf'uuid="{vm["uuid"]}",nic="net0"\}} (\d+)$',
                    text,
                    re.MULTILINE,
                )
            )
        }
        # DHCP: the guest sent at least a discover and a request, and got answers.
        assert counters["receive"] >= 2 and counters["transmit"] >= 2, counters
    finally:
        hive.close()
        for pid in processes_with_arg_prefix(f"--conf-file={dnsmasq_dir}/"):
            kill_and_wait(pid)
        shutil.rmtree(dnsmasq_dir, ignore_errors=True)
        host.close()
