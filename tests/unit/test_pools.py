"""Storage pools, local and shared, over the in-memory driver, on both stores."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.unit.fakehive import Client, fake_hive
from vmhive.services.placement import Candidate, Demand, refusal
from vmhive.services.pools import MARKER_FILE


@pytest.fixture
async def client(tmp_path: Path, hive_db_url: str | None) -> AsyncIterator[Client]:
    async with fake_hive(tmp_path, "vhp", db_url=hive_db_url) as hive:
        yield hive


@pytest.fixture
def mount() -> Iterator[Path]:
    """A directory standing for a shared storage's mount point."""
    path = Path(tempfile.mkdtemp(prefix="vhp-mnt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def pools(client: Client) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in (await client.call("GET", "/api/pools")).json()}


async def definitions(client: Client) -> dict[str, dict[str, object]]:
    """The pools without their free space (which other work on the disk changes)."""
    return {
        name: {k: v for k, v in pool.items() if k not in ("free_bytes", "total_bytes")}
        for name, pool in (await pools(client)).items()
    }


async def test_the_default_pool_is_in_each_nodes_data_dir(client: Client) -> None:
    local = (await pools(client))["local"]
    assert local["path"] == str(client.daemon.settings.data_dir / "pools" / "local")
    assert (local["shared"], local["usable"], local["problem"]) == (False, True, None)
    refused = await client.call("DELETE", "/api/pools/local")
    assert refused.status_code == 409 and "default pool" in refused.json()["detail"]


async def test_a_local_pool_is_made_and_its_volumes_belong_to_this_node(
    client: Client, mount: Path
) -> None:
    directory = mount / "fast"
    made = await client.call("POST", "/api/pools", json={"name": "fast", "path": str(directory)})
    assert made.status_code == 201, made.text
    assert made.json()["usable"] and directory.is_dir()
    await client.ok("POST", "/api/pools/fast/volumes", json={"name": "v1", "size": "16M"})
    volume = (await client.call("GET", "/api/pools/fast/volumes/v1")).json()
    assert volume["node"] == client.daemon.nodes.name
    assert Path(volume["path"]).parent == directory

    refused = await client.call("DELETE", "/api/pools/fast")
    assert refused.status_code == 409 and "holds 1 volumes" in refused.json()["detail"]
    await client.ok("DELETE", "/api/pools/fast/volumes/v1")
    assert (await client.call("DELETE", "/api/pools/fast")).status_code == 200
    assert "fast" not in await pools(client)


async def test_a_shared_pool_is_marked_and_unusable_without_its_marker(
    client: Client, mount: Path
) -> None:
    made = await client.call(
        "POST", "/api/pools", json={"name": "san", "path": str(mount), "shared": True}
    )
    assert made.status_code == 201, made.text
    assert made.json()["shared"] and made.json()["usable"]
    marker = mount / MARKER_FILE
    assert marker.read_text().strip()
    await client.ok("POST", "/api/pools/san/volumes", json={"name": "v1", "size": "16M"})
    volume = (await client.call("GET", "/api/pools/san/volumes/v1")).json()
    assert volume["node"] is None  # every node sees it

    marker.rename(mount / "away")  # as if the storage were not mounted
    san = (await pools(client))["san"]
    assert not san["usable"] and "not mounted here" in str(san["problem"])
    await client.daemon.pools.refresh()
    refused = await client.call(
        "POST", "/api/pools/san/volumes", json={"name": "v2", "size": 1 << 24}
    )
    assert refused.status_code == 409 and "not usable on this node" in refused.json()["detail"]
    refused = await client.call(
        "POST",
        "/api/vms",
        json={"name": "a", "generation": 1, "pool": "san", "disks": [{"size": "16M"}]},
    )
    assert refused.status_code == 409 and "not mounted here" in refused.json()["detail"]
    assert (await client.call("GET", "/api/vms/a")).status_code == 404
    (mount / "away").rename(marker)

    await client.ok("DELETE", "/api/pools/san/volumes/v1")
    assert (await client.call("DELETE", "/api/pools/san")).status_code == 200
    assert not marker.exists() and mount.is_dir()  # the storage itself stays


async def test_bad_pools_are_refused_and_change_nothing(client: Client, mount: Path) -> None:
    before = await definitions(client)
    data = client.daemon.settings.data_dir
    cases = [
        ({"name": "Bad Name", "path": str(mount)}, 422, "invalid pool name"),
        ({"name": "rel", "path": "relative/dir"}, 422, "absolute path"),
        ({"name": "up", "path": f"{mount}/../etc"}, 422, "absolute path"),
        ({"name": "local", "path": str(mount)}, 409, "already exists"),
        ({"name": "inner", "path": str(data / "pools" / "local" / "x")}, 409, "overlaps pool local"),
        ({"name": "san", "path": str(mount / "absent"), "shared": True}, 422, "mount the shared"),
        ({"name": "t", "path": str(mount), "type": "lvm"}, 422, "pool type"),
        ({"name": "t", "path": str(mount), "shraed": True}, 422, "shraed"),
    ]  # fmt: skip
    for body, status, message in cases:
        response = await client.call("POST", "/api/pools", json=body)
        assert response.status_code == status, (body, response.text)
        assert message in str(response.json()["detail"]), (body, response.text)
    assert await definitions(client) == before
    assert not (mount / "absent").exists() and not any(mount.iterdir())

    (mount / MARKER_FILE).write_text("some-other-pool\n")  # another cluster's storage
    taken = await client.call(
        "POST", "/api/pools", json={"name": "san", "path": str(mount), "shared": True}
    )
    assert taken.status_code == 422 and "already holds a vmhive pool" in taken.json()["detail"]
    assert (mount / MARKER_FILE).read_text() == "some-other-pool\n"


async def test_a_vm_in_a_shared_pool_has_its_disks_there(client: Client, mount: Path) -> None:
    await client.call(
        "POST", "/api/pools", json={"name": "san", "path": str(mount), "shared": True}
    )
    images = client.daemon.settings.images
    images.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "16M"], check=True
    )
    overlay = {"name": "a", "generation": 1, "pool": "san",
               "disks": [{"image": "base", "mode": "overlay"}]}  # fmt: skip
    refused = await client.call("POST", "/api/vms", json=overlay)
    assert refused.status_code == 422 and "use mode copy" in refused.json()["detail"]

    job = await client.ok(
        "POST", "/api/vms", json={**overlay, "disks": [{"image": "base"}, {"size": "16M"}]}
    )
    assert any("full copy of image base" in line["message"] for line in job["log"])
    vm = await client.vm("a")
    folder = mount / "vms" / vm["uuid"]
    assert [Path(d["path"]).parent for d in vm["disks"]] == [folder, folder]
    info = subprocess.run(
        ["qemu-img", "info", str(folder / "disk0.qcow2")], capture_output=True, text=True
    )
    assert "backing file" not in info.stdout  # nothing outside the pool

    # Its folder counts as a use of the pool, and goes with the VM.
    refused = await client.call("DELETE", "/api/pools/san")
    assert refused.status_code == 409 and "VM a has disks in pool san" in refused.json()["detail"]
    await client.ok("DELETE", "/api/vms/a")
    assert not folder.exists()


def test_placement_skips_a_node_without_the_pool() -> None:
    node = Candidate("n2", True, False, 4, 8192, 1 << 40, pools=frozenset({"local"}))
    assert refusal(Demand(1, 256, pools=("san",)), node) == "lacks pool san"
    assert refusal(Demand(1, 256, pools=("local",)), node) is None
    unknown = Candidate("n3", True, False, 4, 8192, 1 << 40)
    assert refusal(Demand(1, 256, pools=("san",)), unknown) is None
