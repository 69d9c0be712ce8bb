"""Templates and linked/full clones, with a real guest and real qcow2 chains."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional


def backing_of(path: str) -> str | None:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True
    )
    value: str | None = json.loads(info.stdout).get("backing-filename")
    return value


def test_template_linked_and_full_clones(hive: Hive) -> None:
    hive.create_tiny("golden", 2, "--start")
    hive.wait_ready("golden")
    hive.run_in_guest("golden", "echo prepared-in-template > /root/marker && sync")
    hive.cli("vm", "stop", "golden")

    hive.cli("vm", "template", "golden")
    template = hive.vm("golden")
    assert template["is_template"]
    disk = template["disks"][0]["path"]
    assert Path(disk).stat().st_mode & 0o222 == 0, "template disks are read-only"
    refused = hive.cli("vm", "start", "golden", check=False)
    assert refused.rc == 1 and "is a template" in refused.err

    linked = hive.cli("vm", "clone", "golden", "web1", "--start", "-o", "json").json()
    assert linked["result"]["linked"] is True
    clone = hive.vm("web1")
    assert clone["uuid"] != template["uuid"]
    assert clone["nics"][0]["mac"] != template["nics"][0]["mac"]
    assert clone["disks"][0]["source"] == "linked"
    assert backing_of(clone["disks"][0]["path"]) == disk
    clone_vars = hive.data_dir / "vms" / clone["uuid"] / "OVMF_VARS.fd"
    assert (
        clone_vars.exists()
        and clone_vars != hive.data_dir / "vms" / template["uuid"] / "OVMF_VARS.fd"
    )
    hive.wait_ready("web1")
    assert hive.run_in_guest("web1", "cat /root/marker") == "prepared-in-template"
    hive.run_in_guest("web1", "echo changed > /root/marker && sync")

    full = hive.cli("vm", "clone", "golden", "web2", "--full", "-o", "json").json()
    assert full["result"]["linked"] is False and full["progress"] == 100
    copy = hive.vm("web2")
    assert copy["disks"][0]["source"] == "copy" and backing_of(copy["disks"][0]["path"]) is None

    busy = hive.cli("vm", "delete", "golden", check=False)
    assert busy.rc == 1 and "linked clones: web1" in busy.err
    no_link = hive.cli("vm", "clone", "web2", "web3", "--linked", check=False)
    assert no_link.rc == 1 and "needs a template" in no_link.err
    dup = hive.cli("vm", "clone", "golden", "web2", check=False)
    assert dup.rc == 1 and "already exists" in dup.err

    hive.cli("vm", "delete", "web1", "--force")
    hive.cli("vm", "delete", "golden")  # the full clone does not depend on it
    hive.cli("vm", "start", "web2")
    hive.wait_ready("web2")
    # The full copy holds the template's content, not the linked clone's change.
    assert hive.run_in_guest("web2", "cat /root/marker") == "prepared-in-template"
    hive.cli("vm", "delete", "web2", "--force")


def test_cloud_init_seed_and_new_instance_id_on_clones(hive: Hive, tmp_path: Path) -> None:
    script = tmp_path / "user-data"
    script.write_text('#!/bin/sh\necho "first boot of $(hostname)" >> /root/first-boots\n')
    hive.create_tiny("seeded", 1, "--user-data", str(script), "--start")
    vm = hive.vm("seeded")
    assert vm["cloud_init"] and vm["cloud_init_instance_id"]
    hive.wait_ready("seeded")
    assert (
        f"vmhive-cloud-init: instance-id={vm['cloud_init_instance_id']} hostname=seeded"
        in hive.console_log("seeded")
    )
    assert hive.run_in_guest("seeded", "hostname") == "seeded"
    assert hive.run_in_guest("seeded", "cat /root/first-boots") == "first boot of seeded"
    hive.cli("vm", "stop", "seeded")

    hive.cli("vm", "template", "seeded")
    hive.cli("vm", "clone", "seeded", "sprout", "--start")
    clone = hive.vm("sprout")
    assert clone["cloud_init"] and clone["cloud_init_instance_id"] != vm["cloud_init_instance_id"]
    hive.wait_ready("sprout")
    assert hive.run_in_guest("sprout", "hostname") == "sprout"
    # The template's first boot is in the disk it shares; the clone's new
    # instance id ran the user-data once more, as the new machine.
    assert hive.run_in_guest("sprout", "cat /root/first-boots").splitlines() == [
        "first boot of seeded",
        "first boot of sprout",
    ]
    hive.cli("vm", "delete", "sprout", "--force")
    hive.cli("vm", "delete", "seeded")


def test_full_clone_of_a_running_vm(hive: Hive) -> None:
    """Live block copy: the source runs on, the copy is a flat image of one instant."""
    hive.create_tiny("busy", 2, "--start")
    hive.wait_ready("busy")
    hive.run_in_guest("busy", "echo before-the-copy > /root/marker && sync")
    pid = hive.vm("busy")["pid"]
    job = hive.cli("vm", "clone", "busy", "busy-copy", "--full", "-o", "json").json()
    assert job["result"]["live"] is True and job["progress"] == 100
    assert any("mirror" in line["message"] for line in job["log"])
    source = hive.vm("busy")
    assert source["state"] == "running" and source["pid"] == pid, "the source ran on"
    assert hive.run_in_guest("busy", "cat /root/marker") == "before-the-copy"
    copy = hive.vm("busy-copy")
    assert copy["disks"][0]["source"] == "copy" and backing_of(copy["disks"][0]["path"]) is None
    no_link = hive.cli("vm", "clone", "busy", "busy-link", "--linked", check=False)
    assert no_link.rc == 1 and "needs a template" in no_link.err

    hive.cli("vm", "start", "busy-copy")
    hive.wait_ready("busy-copy")
    assert hive.run_in_guest("busy-copy", "cat /root/marker") == "before-the-copy"
    hive.cli("vm", "delete", "busy-copy", "--force")
    hive.cli("vm", "delete", "busy", "--force")
