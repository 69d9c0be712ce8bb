"""`GET /api/vms` (plain rows, services/listing.py) shows every VM exactly as
`GET /api/vms/NAME` (the ORM object through `VmOut.of`) does, on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from sqlalchemy import update

from tests.unit.fakehive import Client, fake_hive
from vmhive.api.schemas import VmOut
from vmhive.network.dnsmasq_config import DnsmasqPaths
from vmhive.store.models import Network, Nic, Vm

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJHmv3WKihOIZp4SXi5wlLv/IbXAUjf0JS8fPAE/lju a@b"
LAB_MAC = "52:54:00:7e:00:01"
LAB_LEASE = "10.231.7.50"
VM_LIST = TypeAdapter(list[VmOut])


@pytest.fixture
async def api(tmp_path: Path, hive_db_url: str | None) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhl", db_url=hive_db_url) as hive:
        # Nothing may reconcile the network row added below onto the host.
        await hive.daemon.agent.stop_loop()
        yield hive


async def listed(api: Client) -> list[dict[str, Any]]:
    response = await api.call("GET", "/api/vms")
    assert response.status_code == 200, response.text
    # Byte for byte what the response model writes: same keys, order, formats.
    assert VM_LIST.dump_json(VM_LIST.validate_json(response.content)) == response.content
    vms: list[dict[str, Any]] = response.json()
    return vms


async def assert_list_matches_show(api: Client) -> dict[str, dict[str, Any]]:
    vms = await listed(api)
    names = [vm["name"] for vm in vms]
    assert names == sorted(names)
    for vm in vms:
        assert vm == await api.vm(vm["name"])
    return {vm["name"]: vm for vm in vms}


async def add_lab_network(api: Client, vm_name: str) -> None:
    """An internal network (a row only: nothing on the host) with a NIC of
    `vm_name` on it, a reserved address and a lease as dnsmasq writes it."""
    async with api.daemon.sessions() as session:
        network = Network(
            name="lab",
            type="internal",
            bridge="vh-blab",
            subnet="10.231.7.0/24",
            gateway="10.231.7.1",
            dhcp_start="10.231.7.10",
            dhcp_end="10.231.7.200",
        )
        session.add(network)
        await session.flush()
        vm = await api.daemon.ctx.find_vm(session, vm_name)
        session.add(
            Nic(
                vm_id=vm.id,
                index=1,
                mac=LAB_MAC,
                model="e1000",
                backend="tap",
                network_id=network.id,
                ip="10.231.7.9",
                vlan=None,
                link_up=False,
            )
        )
        await session.commit()
    leases = DnsmasqPaths(api.daemon.networks.run_dir.absolute() / "lab").leases
    leases.parent.mkdir(parents=True)
    leases.write_text(f"0 {LAB_MAC} {LAB_LEASE} {vm_name} *\n")
    # The list shows the leases last read (the reconciler reads them every few
    # seconds; its loop is stopped here), a VM's own page reads them afresh.
    assert (await api.vm(vm_name))["nics"][1]["ip"] == LAB_LEASE


async def test_list_shows_each_vm_as_show_does(api: Client) -> None:
    iso = bytearray(64 * 1024)
    iso[0x8001:0x8006] = b"CD001"
    await api.ok("PUT", "/api/isos/boot.iso/upload", content=bytes(iso))
    settings = {"hostname": "alpha-host", "ssh_keys": [KEY], "ipconfig": ["ip=10.0.0.5/24"]}
    await api.ok(
        "POST",
        "/api/vms",
        json={
            "name": "alpha",
            "memory_mib": 256,
            "disks": [{"size": "16M"}, {"size": "8M"}],
            "cdrom": True,
            "description": "two disks, a drive, cloud-init",
            "cloud_init_settings": settings,
            "start": True,
        },
    )
    await api.ok(
        "POST",
        "/api/vms",
        json={"name": "beta", "generation": 1, "memory_mib": 64, "iso": "boot.iso"},
    )
    await api.ok("POST", "/api/vms", json={"name": "gamma", "nic": False, "cloud_init": True})
    await api.ok("POST", "/api/vms", json={"name": "gone", "generation": 1, "memory_mib": 64})
    await add_lab_network(api, "beta")
    async with api.daemon.sessions() as session:
        await session.execute(update(Vm).where(Vm.name == "gamma").values(node_id=None))
        await session.execute(update(Vm).where(Vm.name == "gone").values(state="deleting"))
        await session.commit()

    vms = await assert_list_matches_show(api)

    # What was compared is what the VMs really have, so the comparison can fail.
    assert list(vms) == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = vms["alpha"], vms["beta"], vms["gamma"]
    assert [d["size_bytes"] for d in alpha["disks"]] == [16 * 1024**2, 8 * 1024**2]
    assert alpha["cdroms"] == [{"index": 0, "iso": None}]
    assert alpha["state"] == "running" and alpha["pid"]
    assert alpha["cloud_init"] and alpha["cloud_init_instance_id"]
    assert beta["cdroms"][0]["iso"].endswith("boot.iso")
    assert beta["cloud_init_instance_id"] is None
    lab = beta["nics"][1]
    assert (lab["network"], lab["ip"], lab["reserved_ip"], lab["link_up"]) == (
        "lab",
        LAB_LEASE,
        "10.231.7.9",
        False,
    )
    assert beta["nics"][0]["network"] is None and beta["nics"][0]["ip"] is None
    assert gamma["nics"] == [] and gamma["node"] == "" and alpha["node"] != ""
    assert (await api.call("GET", "/api/vms/gone")).status_code == 404


async def test_list_follows_cloud_init_changes(api: Client) -> None:
    await api.ok("POST", "/api/vms", json={"name": "ci", "cloud_init": True})
    before = (await assert_list_matches_show(api))["ci"]["cloud_init_instance_id"]
    settings = {"hostname": "renamed", "ipconfig": ["dhcp"]}
    await api.ok("PUT", "/api/vms/ci/cloud-init", json=settings)
    after = (await assert_list_matches_show(api))["ci"]["cloud_init_instance_id"]
    shown = (await api.call("GET", "/api/vms/ci/cloud-init")).json()["instance_id"]
    assert after == shown != before
    await api.ok("DELETE", "/api/vms/ci/cloud-init")
    assert (await assert_list_matches_show(api))["ci"]["cloud_init_instance_id"] is None
