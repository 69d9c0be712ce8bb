"""Storage pools and volumes with real qemu-img and a real guest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional

MIB = 1024 * 1024


def test_default_pool_and_volume_lifecycle(hive: Hive) -> None:
    pools = hive.cli("pool", "list", "-o", "json").json()
    local = next(p for p in pools if p["name"] == "local")
    assert local["type"] == "dir" and Path(local["path"]).is_dir()
    assert local["free_bytes"] > 0 and local["total_bytes"] >= local["free_bytes"]
    assert hive.cli("pool", "show", "local", "-o", "json").json()["path"] == local["path"]

    hive.cli("volume", "create", "data1", "--size", "64M")
    vol = hive.cli("volume", "show", "data1", "-o", "json").json()
    assert vol["virtual_size"] == 64 * MIB and 0 < vol["allocated_size"] < 4 * MIB  # thin
    assert Path(vol["path"]).parent == Path(local["path"]) and vol["attached_to"] == []
    names = [v["name"] for v in hive.cli("volume", "list", "-o", "json").json()]
    assert "data1" in names

    for args, message in [
        (["volume", "create", "data1", "--size", "64M"], "already has a volume"),
        (["volume", "create", "Bad/Name", "--size", "64M"], "invalid volume name"),
        (["volume", "create", "huge", "--size", "100T"], "between 1 MiB and 64 TiB"),
        (["volume", "create", "x", "--size", "64M", "--pool", "nopool"], "no storage pool"),
        (["volume", "resize", "data1", "--size", "32M"], "volumes only grow"),
        (["volume", "show", "missing"], "no volume"),
    ]:
        result = hive.cli(*args, check=False)
        assert result.rc == 1 and message in result.err, (args, result.err)
    assert hive.cli("volume", "show", "data1", "-o", "json").json()["virtual_size"] == 64 * MIB

    hive.cli("volume", "resize", "data1", "--size", "96M")
    assert hive.cli("volume", "show", "data1", "-o", "json").json()["virtual_size"] == 96 * MIB
    hive.cli("volume", "delete", "data1")
    assert not Path(vol["path"]).exists()


def test_attach_resize_online_and_detach(hive: Hive) -> None:
    hive.cli("volume", "create", "extra", "--size", "32M")
    hive.create_tiny("withdata", 2)
    hive.cli("vm", "disk", "attach", "withdata", "extra")
    vm = hive.vm("withdata")
    assert [d["source"] for d in vm["disks"]] == ["overlay", "volume"]
    assert hive.cli("volume", "show", "extra", "-o", "json").json()["attached_to"] == ["withdata"]

    refused = hive.cli("volume", "delete", "extra", check=False)
    assert refused.rc == 1 and "attached to VM withdata" in refused.err
    twice = hive.cli("vm", "disk", "attach", "withdata", "extra", check=False)
    assert twice.rc == 1 and "already attached" in twice.err

    hive.cli("vm", "start", "withdata")
    hive.wait_ready("withdata")
    sectors = hive.run_in_guest("withdata", "cat /sys/block/vdb/size")
    assert int(sectors) * 512 == 32 * MIB

    # Online growth: the running guest sees the new capacity.
    hive.cli("volume", "resize", "extra", "--size", "48M")
    sectors = hive.run_in_guest("withdata", "cat /sys/block/vdb/size")
    assert int(sectors) * 512 == 48 * MIB

    # Hot-unplug, then hot-plug again, while the guest runs.
    hive.cli("vm", "disk", "detach", "withdata", "extra")
    assert [d["source"] for d in hive.vm("withdata")["disks"]] == ["overlay"]
    assert hive.run_in_guest("withdata", "ls /sys/block | grep -c vd") == "1"
    hive.cli("volume", "create", "hot", "--size", "24M")
    hive.cli("vm", "disk", "attach", "withdata", "hot")
    assert hive.vm("withdata")["state"] == "running"
    sizes = hive.run_in_guest("withdata", "for d in /sys/block/vd*; do cat $d/size; done")
    assert [int(x) * 512 for x in sizes.split()][1:] == [24 * MIB]
    hive.cli("vm", "stop", "withdata")

    # A VM's deletion never takes a pool volume with it.
    hive.cli("vm", "disk", "attach", "withdata", "extra")
    hive.cli("vm", "delete", "withdata")
    for name in ("extra", "hot"):
        vol = hive.cli("volume", "show", name, "-o", "json").json()
        assert vol["attached_to"] == [] and Path(vol["path"]).exists()
        check = subprocess.run(["qemu-img", "check", vol["path"]], capture_output=True)
        assert check.returncode == 0, check.stdout
        hive.cli("volume", "delete", name)


def test_gen1_has_no_hotplug(hive: Hive) -> None:
    hive.cli("volume", "create", "cold", "--size", "16M")
    hive.cli("vm", "create", "oldie", "-g", "1", "--memory", "64", "--disk-size", "16M", "--start")
    refused = hive.cli("vm", "disk", "attach", "oldie", "cold", check=False)
    assert refused.rc == 1 and "generation 1 (IDE) has no hot-plug" in refused.err
    assert len(hive.vm("oldie")["disks"]) == 1
    hive.cli("vm", "delete", "oldie", "--force")
    hive.cli("volume", "delete", "cold")


def test_gen1_disk_slots_are_limited(hive: Hive) -> None:
    """Gen 1 has four IDE slots for disks and CD-ROMs together."""
    hive.cli("vm", "create", "ide", "-g", "1", "--memory", "64", "--disk-size", "16M")
    for i in range(3):
        hive.cli("volume", "create", f"ide{i}", "--size", "16M")
        hive.cli("vm", "disk", "attach", "ide", f"ide{i}")
    hive.cli("volume", "create", "ide3", "--size", "16M")
    full = hive.cli("vm", "disk", "attach", "ide", "ide3", check=False)
    assert full.rc == 1 and "cannot attach ide3" in full.err
    assert len(hive.vm("ide")["disks"]) == 4
    hive.cli("vm", "delete", "ide")
    for i in range(4):
        hive.cli("volume", "delete", f"ide{i}")


def make_iso(directory: Path, label: str, files: dict[str, str]) -> Path:
    content = directory / f"{label}-content"
    content.mkdir()
    for name, text in files.items():
        (content / name).write_text(text)
    iso = directory / f"{label}.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-V", label, "-o", str(iso), str(content)],
        check=True,
    )
    return iso


def test_iso_library_and_cdrom_insert_eject_while_running(hive: Hive, tmp_path: Path) -> None:
    iso = make_iso(tmp_path, "DRIVERS", {"readme.txt": "virtio drivers\n"})
    hive.cli("iso", "import", str(iso), "--name", "drivers.iso")
    listed = hive.cli("iso", "list", "-o", "json").json()
    assert [(i["name"], i["size"]) for i in listed] == [("drivers.iso", iso.stat().st_size)]
    not_iso = tmp_path / "not.iso"
    not_iso.write_bytes(b"\0" * 40000)
    refused = hive.cli("iso", "import", str(not_iso), check=False)
    assert refused.rc == 1 and "not an ISO 9660 image" in refused.err
    dup = hive.cli("iso", "import", str(iso), "--name", "drivers.iso", check=False)
    assert dup.rc == 1 and "already has" in dup.err

    hive.create_tiny("cdswap", 1, "--cdrom", "--start")
    assert hive.vm("cdswap")["cdroms"] == [{"index": 0, "iso": None}]
    hive.wait_ready("cdswap")
    hive.cli("vm", "cdrom", "insert", "cdswap", "drivers.iso")
    assert hive.vm("cdswap")["cdroms"][0]["iso"].endswith("/iso/drivers.iso")
    out = hive.run_in_guest(
        "cdswap", "mkdir -p /tmp/cd && mount -r /dev/sr0 /tmp/cd && cat /tmp/cd/readme.txt"
    )
    assert out.splitlines()[-1] == "virtio drivers"
    busy = hive.cli("iso", "delete", "drivers.iso", check=False)
    assert busy.rc == 1 and "cdswap" in busy.err

    hive.run_in_guest("cdswap", "umount /tmp/cd")
    hive.cli("vm", "cdrom", "eject", "cdswap")
    assert hive.vm("cdswap")["cdroms"][0]["iso"] is None
    gone = hive.run_in_guest("cdswap", "mount -r /dev/sr0 /tmp/cd 2>&1; echo rc=$?")
    assert gone.splitlines()[-1] != "rc=0", gone
    hive.cli("iso", "delete", "drivers.iso")
    assert hive.cli("iso", "list", "-o", "json").json() == []
    missing = hive.cli("vm", "cdrom", "eject", "cdswap", "--drive", "3", check=False)
    assert missing.rc == 1 and "no CD-ROM drive 3" in missing.err
    hive.cli("vm", "delete", "cdswap", "--force")


@pytest.mark.parametrize("fmt", ["vmdk", "vhdx", "vdi", "vpc", "raw"])
def test_import_from_other_hypervisors(hive: Hive, fmt: str) -> None:
    imports = hive.data_dir / "import"
    imports.mkdir(exist_ok=True)
    source = imports / f"seed-{fmt}.raw"
    source.write_bytes(b"vmhive import test\n" * 50000 + b"\0" * 1024 * 1024)
    foreign = imports / f"disk.{fmt}"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, str(source), str(foreign)], check=True
    )
    job = hive.cli("volume", "import", str(foreign), "--name", f"from-{fmt}", "-o", "json").json()
    assert job["state"] == "succeeded" and job["progress"] == 100
    vol = hive.cli("volume", "show", f"from-{fmt}", "-o", "json").json()
    assert vol["format"] == "qcow2"
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), vol["path"]],
        capture_output=True,
    )
    assert same.returncode == 0, same.stdout
    hive.cli("volume", "delete", f"from-{fmt}")


def test_hostile_images_are_refused_and_leave_nothing(hive: Hive) -> None:
    imports = hive.data_dir / "import"
    imports.mkdir(exist_ok=True)
    backed = imports / "backed.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            str(backed),
            "1M",
        ],
        check=True,
    )
    before = hive.cli("volume", "list", "-o", "json").json()
    for args, message in [
        ([str(backed), "--name", "evil"], "backing file"),
        ([str(backed), "--name", "evil", "--format", "vmdk"], "refusing to import"),
        (["/etc/shadow", "--name", "evil"], "outside the allowed directories"),
        ([str(backed), "--name", "evil", "--format", "exe"], "format must be auto or one of"),
    ]:
        result = hive.cli("volume", "import", *args, check=False)
        assert result.rc == 1 and message in result.err, (args, result.err)
    assert hive.cli("volume", "list", "-o", "json").json() == before
    pool = Path(hive.cli("pool", "show", "local", "-o", "json").json()["path"])
    assert not list(pool.glob("evil*"))
