"""Snapshots with real guests: disk-only and with RAM, the tree, delete, schedules,
clones from snapshots, and what a killed daemon or a killed QEMU leaves behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.functional.hive import Hive, wait_for

pytestmark = pytest.mark.functional

TICKER = "(i=0; while :; do echo tick-$i; i=$((i+1)); sleep 1; done) &"


def guest(hive: Hive, vm: str, command: str, timeout: float = 60) -> str:
    """A command's output in the guest, without the ticker's lines."""
    lines = hive.run_in_guest(vm, command, timeout).splitlines()
    return "\n".join(line for line in lines if not line.startswith("tick-"))


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick-(\d+)\r?$", text, re.MULTILINE)]


def snapshots(hive: Hive, vm: str) -> dict[str, dict[str, Any]]:
    rows = hive.cli("snapshot", "list", vm, "-o", "json").json()
    return {row["name"]: row for row in rows}


def tags(path: str) -> list[str]:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True
    )
    return sorted(s["name"] for s in json.loads(info.stdout).get("snapshots", []))


def head(path: str, size: int = 32) -> str:
    """The first bytes of a stopped VM's disk, as text."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "head"
        subprocess.run(
            ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={size}", "count=1",
             f"if={path}", f"of={out}"],
            capture_output=True, check=True,
        )  # fmt: skip
        return out.read_bytes().decode(errors="replace")


def assert_clean(*paths: str) -> None:
    for path in paths:
        result = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
        assert result.returncode == 0, f"qemu-img check {path}: {result.stdout}{result.stderr}"


def test_gen2_two_disks_ram_and_disk_snapshots_tree_delete_and_clone(hive: Hive) -> None:
    """Both disks and the RAM at one instant; revert to any snapshot; branch; delete a
    middle one; clone from a snapshot; the UEFI variables come back with a revert."""
    body = {
        "name": "snap2", "generation": 2, "memory_mib": 256, "start": True,
        "disks": [{"image": "tiny"}, {"size": "64M"}],
    }  # fmt: skip
    created = hive.api("POST", "/api/vms", params={"wait": "true"}, json=body).json()
    assert created["state"] == "succeeded", created
    vm = hive.vm("snap2")
    disk0, disk1 = (d["path"] for d in vm["disks"])
    vars_file = hive.data_dir / "vms" / vm["uuid"] / "OVMF_VARS.fd"
    hive.wait_ready("snap2")

    guest(hive, "snap2", "echo one > /root/f; echo disk1-one > /dev/vdb; sync")
    job = hive.cli("snapshot", "create", "snap2", "s1", "-o", "json").json()
    assert job["result"]["pause_ms"] is not None and job["result"]["pause_ms"] > 0
    log = [line["message"] for line in job["log"]]
    assert "no guest agent: the snapshot is crash-consistent" in log, log
    s1 = snapshots(hive, "snap2")["s1"]
    assert (s1["with_memory"], s1["vm_state"], s1["disks"]) == (False, "running", [disk0, disk1])
    assert tags(disk0) == tags(disk1) == [s1["tag"]], "every disk holds the snapshot"
    snapshot_vars = hive.data_dir / "vms" / vm["uuid"] / "snapshots" / f"{s1['tag']}.fd"
    assert snapshot_vars.read_bytes() == vars_file.read_bytes()

    # With RAM: a running counter and a file in tmpfs are part of the snapshot.
    guest(
        hive, "snap2", "echo two > /root/f; echo disk1-two > /dev/vdb; echo ram-two > /tmp/m; sync"
    )
    hive.run_in_guest_nowait("snap2", TICKER)
    wait_for(lambda: max(ticks(hive.console_log("snap2")), default=-1) >= 2, 60, "tick-2")
    hive.cli("snapshot", "create", "snap2", "s2", "--memory", "--description", "with RAM")
    at_snapshot = max(ticks(hive.console_log("snap2")))
    guest(hive, "snap2", "echo three > /root/f; echo disk1-three > /dev/vdb; echo ram-three > /tmp/m; sync")  # fmt: skip
    wait_for(lambda: max(ticks(hive.console_log("snap2"))) >= at_snapshot + 5, 60, "more ticks")
    hive.cli("vm", "pause", "snap2")  # the old guest prints nothing more from here
    console_before = len(hive.console_log("snap2"))
    pid = hive.vm("snap2")["pid"]

    revert = hive.cli("snapshot", "revert", "snap2", "s2", "-o", "json").json()
    assert revert["result"]["started"] is True
    after = hive.vm("snap2")
    assert after["state"] == "running" and after["pid"] != pid, "a new QEMU, resumed"
    wait_for(lambda: ticks(hive.console_log("snap2")[console_before:]), 30, "a tick after revert")
    first = ticks(hive.console_log("snap2")[console_before:])[0]
    # The counter goes on from the snapshot, not from 0 and not from where it was.
    assert at_snapshot - 3 <= first <= at_snapshot + 1, (at_snapshot, first)
    assert (
        guest(hive, "snap2", "cat /tmp/m /root/f; head -c 9 /dev/vdb") == "ram-two\ntwo\ndisk1-two"
    )
    assert hive.console_log("snap2").count("vmhive-guest-ready") == 1, "it did not boot again"

    # Back to the older, disk-only snapshot: the running VM is forced off.
    revert = hive.cli("snapshot", "revert", "snap2", "s1", "-o", "json").json()
    assert revert["result"]["started"] is False and hive.vm("snap2")["state"] == "stopped"
    assert vars_file.read_bytes() == snapshot_vars.read_bytes()
    assert head(disk1).startswith("disk1-one")
    hive.cli("vm", "start", "snap2")
    hive.wait_ready("snap2", count=2)
    assert guest(hive, "snap2", "cat /root/f; head -c 9 /dev/vdb") == "one\ndisk1-one"

    # New snapshots branch from s1: s1 -> (s2, s3 -> s4).
    guest(hive, "snap2", "echo disk1-four > /dev/vdb; sync")
    hive.cli("snapshot", "create", "snap2", "s3")
    guest(hive, "snap2", "echo disk1-five > /dev/vdb; sync")
    hive.cli("snapshot", "create", "snap2", "s4")
    tree = snapshots(hive, "snap2")
    assert {n: s["parent"] for n, s in tree.items()} == {
        "s1": None, "s2": "s1", "s3": "s1", "s4": "s3",
    }  # fmt: skip
    assert [n for n, s in tree.items() if s["current"]] == ["s4"]
    listing = hive.cli("snapshot", "list", "snap2").out
    assert "├─ s2" in listing and "└─ s3" in listing and "└─ s4 *" in listing, listing

    # Delete the middle one: its neighbours stay revertable.
    hive.cli("snapshot", "delete", "snap2", "s3")
    tree = snapshots(hive, "snap2")
    assert {n: s["parent"] for n, s in tree.items()} == {"s1": None, "s2": "s1", "s4": "s1"}
    assert tags(disk0) == tags(disk1) == sorted(s["tag"] for s in tree.values())
    hive.cli("vm", "force-stop", "snap2")
    hive.cli("snapshot", "revert", "snap2", "s4")
    assert head(disk1).startswith("disk1-five")
    hive.cli("snapshot", "revert", "snap2", "s1")
    assert head(disk1).startswith("disk1-one")

    # A full clone of what s4 holds, while the source stays at s1.
    hive.cli("vm", "clone", "snap2", "from-s4", "--snapshot", "s4")
    copy = hive.vm("from-s4")
    assert [d["source"] for d in copy["disks"]] == ["copy", "copy"]
    assert head(copy["disks"][1]["path"]).startswith("disk1-five")
    assert tags(copy["disks"][0]["path"]) == [], "a clone starts without snapshots"
    assert_clean(disk0, disk1, *(d["path"] for d in copy["disks"]))

    # The RAM snapshot is still intact after all that.
    hive.cli("snapshot", "revert", "snap2", "s2")
    assert guest(hive, "snap2", "cat /tmp/m /root/f") == "ram-two\ntwo"
    refused = hive.cli("snapshot", "create", "snap2", "s1", check=False)
    assert refused.rc == 1 and "already has a snapshot" in refused.err
    hive.cli("vm", "delete", "from-s4")
    hive.cli("vm", "delete", "snap2", "--force")
    assert not (hive.data_dir / "vms" / vm["uuid"]).exists()


def test_gen1_linked_clone_snapshots_and_a_schedule(hive: Hive) -> None:
    """Internal snapshots live in the clone's overlay; the template's disk is untouched.
    A schedule with a short period takes snapshots and expires the oldest."""
    hive.create_tiny("snapbase", 1)
    hive.cli("vm", "template", "snapbase")
    base = hive.vm("snapbase")["disks"][0]["path"]
    base_before = Path(base).stat().st_mtime_ns
    hive.cli("vm", "clone", "snapbase", "snap1", "--start")
    disk = hive.vm("snap1")["disks"][0]["path"]
    hive.wait_ready("snap1")

    guest(hive, "snap1", "echo one > /root/f; sync")
    hive.cli("snapshot", "create", "snap1", "disk-only")
    guest(hive, "snap1", "echo two > /root/f; echo ram-two > /tmp/m; sync")
    hive.cli("snapshot", "create", "snap1", "with-ram", "--memory")
    guest(hive, "snap1", "echo three > /root/f; echo ram-three > /tmp/m; sync")

    hive.cli("snapshot", "revert", "snap1", "with-ram")
    assert guest(hive, "snap1", "cat /tmp/m /root/f") == "ram-two\ntwo"
    hive.cli("snapshot", "revert", "snap1", "disk-only", "--start")
    hive.wait_ready("snap1", count=2)
    assert guest(hive, "snap1", "cat /root/f; [ -e /tmp/m ] || echo booted") == "one\nbooted"
    assert Path(base).stat().st_mtime_ns == base_before and tags(base) == []

    hive.cli("snapshot", "schedule", "snap1", "--every", "5s", "--keep", "2")
    schedules = hive.cli("snapshot", "schedules", "snap1", "-o", "json").json()
    assert [(s["every"], s["keep"]) for s in schedules] == [("5s", 2)]

    def scheduled_runs() -> int:
        jobs = hive.api("GET", "/api/jobs", params={"limit": 100}).json()
        return sum(
            1 for j in jobs if j["kind"] == "snapshot.scheduled" and j["state"] == "succeeded"
        )

    wait_for(lambda: scheduled_runs() >= 3, 60, "three scheduled snapshots")
    hive.cli("snapshot", "unschedule", "snap1", "--every", "5s")
    runs = scheduled_runs()
    hive.cli("vm", "force-stop", "snap1")  # waits behind a scheduled job still running
    auto = sorted(n for n in snapshots(hive, "snap1") if n.startswith("auto-5s-"))
    assert len(auto) == 2 and runs >= 3, (auto, runs)
    assert set(snapshots(hive, "snap1")) == {"disk-only", "with-ram", *auto}
    assert len(tags(disk)) == 4, "the expired ones are gone from the image"
    hive.cli("snapshot", "revert", "snap1", auto[0])  # scheduled ones revert like any
    assert_clean(disk, base)
    hive.cli("vm", "delete", "snap1")
    hive.cli("vm", "delete", "snapbase")


def test_interrupted_snapshots_leave_earlier_ones_intact(own_hive: Hive) -> None:
    """kill -9 of the daemon, then of QEMU, in the middle of a snapshot with RAM."""
    hive = own_hive
    hive.create_tiny("crashy", 1, "--memory", "384", "--start")
    disk = hive.vm("crashy")["disks"][0]["path"]
    hive.wait_ready("crashy")
    guest(hive, "crashy", "echo one > /root/f; sync")
    hive.cli("snapshot", "create", "crashy", "safe")
    guest(hive, "crashy", "echo two > /root/f; sync")
    # Busy RAM makes saving it take long enough to be cut short in the middle.
    guest(hive, "crashy", "dd if=/dev/urandom of=/tmp/noise bs=1M count=150", timeout=120)

    def begin_ram_snapshot(name: str) -> str:
        body = {"name": name, "memory": True}
        job_id: str = hive.api("POST", "/api/vms/crashy/snapshots", json=body).json()["id"]

        def pausing() -> bool:
            log = hive.api("GET", f"/api/jobs/{job_id}").json()["log"]
            return any("the guest pauses" in line["message"] for line in log)

        wait_for(pausing, 30, f"snapshot {name} to begin", interval=0.01)
        return job_id

    begin_ram_snapshot("cut-short")
    hive.kill_daemon()
    hive.start()
    assert "removing snapshot cut-short of crashy: it was interrupted" in hive.daemon_log()
    vm = hive.wait_state("crashy", "running")  # the guest the snapshot paused is resumed
    assert set(snapshots(hive, "crashy")) == {"safe"}
    assert tags(disk) == [snapshots(hive, "crashy")["safe"]["tag"]]
    assert guest(hive, "crashy", "cat /root/f") == "two"

    job_id = begin_ram_snapshot("killed")
    os.kill(vm["pid"], signal.SIGKILL)
    ended = wait_for(
        lambda: (j := hive.api("GET", f"/api/jobs/{job_id}").json())["state"] != "running" and j,
        60,
        "the snapshot job to end",
    )
    assert ended["state"] == "failed", ended
    messages = [line["message"] for line in ended["log"]]
    assert "rollback: remove the unfinished snapshot killed" in messages, messages
    hive.wait_state("crashy", "crashed")
    assert set(snapshots(hive, "crashy")) == {"safe"}
    assert tags(disk) == [snapshots(hive, "crashy")["safe"]["tag"]]
    assert_clean(disk)

    # The VM boots, and the snapshot from before both crashes still reverts.
    hive.cli("vm", "start", "crashy")
    hive.wait_ready("crashy", count=2)
    assert guest(hive, "crashy", "cat /root/f") == "two"
    hive.cli("snapshot", "revert", "crashy", "safe", "--start")
    hive.wait_ready("crashy", count=3)
    assert guest(hive, "crashy", "cat /root/f") == "one"
    hive.cli("vm", "force-stop", "crashy")
    assert_clean(disk)
    hive.cli("vm", "delete", "crashy")
