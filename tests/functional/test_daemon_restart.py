"""The daemon can die or restart without touching guests, and recovers what it left."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.functional.hive import Hive, wait_for

pytestmark = pytest.mark.functional


def uptime(hive: Hive, name: str) -> float:
    return float(hive.run_in_guest(name, "cat /proc/uptime").split()[0])


def test_kill_9_daemon_readopts_running_vms(own_hive: Hive) -> None:
    hive = own_hive
    hive.create_tiny("alpha", 1, "--start")
    hive.create_tiny("beta", 2, "--start")
    hive.wait_ready("alpha")
    hive.wait_ready("beta")
    before = {name: hive.vm(name)["pid"] for name in ("alpha", "beta")}
    up_before = {name: uptime(hive, name) for name in before}

    hive.kill_daemon()
    for pid in before.values():
        assert Path(f"/proc/{pid}").exists(), "killing the daemon must not touch guests"
    hive.start()

    for name, pid in before.items():
        vm = hive.vm(name)
        assert vm["state"] == "running", vm
        assert vm["pid"] == pid
        assert uptime(hive, name) > up_before[name]
    assert "re-adopted VM alpha" in hive.daemon_log()
    host = hive.cli("host", "info", "--output", "json").json()
    assert host["unowned_qemu_processes"] == []

    # The re-adopted VMs are fully managed: a graceful stop works.
    hive.cli("vm", "stop", "alpha")
    assert hive.vm("alpha")["state"] == "stopped"
    hive.cli("vm", "force-stop", "beta")


def test_autostart_and_stale_state_after_restart(own_hive: Hive) -> None:
    hive = own_hive
    hive.create_tiny("auto", 1, "--autostart")
    hive.create_tiny("manual", 1, "--start")
    manual_pid = hive.vm("manual")["pid"]
    hive.kill_daemon()
    # While the daemon is away, the manual VM's QEMU dies.
    os.kill(manual_pid, signal.SIGKILL)
    hive.start()
    manual = hive.wait_state("manual", "crashed")
    assert "while the daemon was not running" in manual["state_reason"]
    auto = hive.wait_state("auto", "running", timeout=60)
    assert auto["pid"]


def test_interrupted_jobs_are_failed_and_rolled_back(own_hive: Hive) -> None:
    """Fake what a daemon killed mid-create and mid-delete leaves, then restart."""
    hive = own_hive
    hive.create_tiny("keeper", 1)
    hive.create_tiny("halfdeleted", 1)
    doomed_uuid = hive.vm("halfdeleted")["uuid"]
    hive.stop_daemon()

    half_uuid = str(uuid.uuid4())
    half_dir = hive.data_dir / "vms" / half_uuid
    half_dir.mkdir(parents=True)
    (half_dir / "disk0.qcow2").write_bytes(b"partial")
    job_id = str(uuid.uuid4())
    db = sqlite3.connect(hive.data_dir / "vmhive.db")
    with db:
        db.execute(
            "INSERT INTO vms (uuid, name, description, generation, vcpus, memory_mib, machine,"
            " boot_order, autostart, desired_state, state, state_reason, created_at, updated_at)"
            " VALUES (?, 'half', '', 1, 1, 128, 'pc-i440fx-7.2', 'disk', 0, 'stopped',"
            " 'creating', '', '2026-01-01', '2026-01-01')",
            (half_uuid,),
        )
        db.execute(
            "INSERT INTO jobs (id, kind, target, state, progress, params, created_at)"
            " VALUES (?, 'vm.create', ?, 'running', 40, '{}', '2026-01-01')",
            (job_id, f"vm:{half_uuid}"),
        )
        db.execute("UPDATE vms SET state='deleting' WHERE uuid=?", (doomed_uuid,))
    db.close()

    hive.start()
    job = hive.cli("job", "show", job_id, "--output", "json").json()
    assert job["state"] == "failed" and "interrupted" in job["error"]
    names = [vm["name"] for vm in hive.cli("vm", "list", "--output", "json").json()]
    assert names == ["keeper"]
    assert not half_dir.exists()
    assert not (hive.data_dir / "vms" / doomed_uuid).exists()
    assert hive.vm("keeper")["state"] == "stopped"


def test_unowned_qemu_in_the_run_dir_is_reported(own_hive: Hive) -> None:
    hive = own_hive
    hive.stop_daemon()
    stray_dir = hive.data_dir / "run" / "stray"
    stray_dir.mkdir(parents=True)
    stray = subprocess.Popen(
        [
            "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{stray_dir / 'qmp.sock'},server=on,wait=off",
        ],
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (stray_dir / "qmp.sock").exists(), 10, "the stray QEMU")
        hive.start()
        host = hive.cli("host", "info", "--output", "json").json()
        assert [p["pid"] for p in host["unowned_qemu_processes"]] == [stray.pid]
        assert "belongs to no VM" in hive.daemon_log()
        assert stray.poll() is None, "an unowned QEMU is reported, never killed"
    finally:
        stray.kill()
        stray.wait(10)


def test_a_start_interrupted_before_the_guest_ran_is_rolled_back(own_hive: Hive) -> None:
    """The daemon dies after launching QEMU (-S) but before `cont`."""
    hive = own_hive
    hive.create_tiny("halfway", 1, "--start")
    vm = hive.vm("halfway")
    run_dir = hive.data_dir / "run" / vm["uuid"]
    record = json.loads((run_dir / "runtime.json").read_text())
    assert record["argv"][-1] == "-S"
    hive.cli("vm", "force-stop", "halfway")
    hive.stop_daemon()

    for stale in ("qmp.sock", "serial.sock", "vnc.sock"):
        (run_dir / stale).unlink(missing_ok=True)
    qemu = subprocess.Popen(record["argv"], start_new_session=True, stderr=subprocess.DEVNULL)
    wait_for(lambda: (run_dir / "qmp.sock").exists(), 10, "QEMU's monitor socket")
    (run_dir / "runtime.json").write_text(json.dumps({**record, "pid": qemu.pid}))
    db = sqlite3.connect(hive.data_dir / "vmhive.db")
    with db:
        db.execute("UPDATE vms SET state='starting', desired_state='running' WHERE name='halfway'")
    db.close()

    hive.start()
    vm = hive.vm("halfway")
    assert vm["state"] == "stopped" and vm["pid"] is None, vm
    assert vm["state_reason"] == "an interrupted start was rolled back"
    assert qemu.wait(15) is not None, "the never-started QEMU is gone"
    # And it starts normally afterwards.
    hive.cli("vm", "start", "halfway")
    assert hive.vm("halfway")["state"] == "running"


def _job_progress(hive: Hive, job_id: str) -> int:
    return int(hive.api("GET", f"/api/jobs/{job_id}").json()["progress"])


def _processes_using(path_fragment: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if path_fragment.encode() in cmdline and b"qemu-img" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_daemon_killed_in_a_full_clone_is_cleaned_up_at_next_start(own_hive: Hive) -> None:
    """kill -9 in the middle of copying: the qemu-img child dies with the daemon, and
    the next start removes the half-made clone, its directory and its record."""
    hive = own_hive
    hive.cli("vm", "create", "bulky", "-g", "1", "--memory", "64", "--disk-size", "2G")
    source = hive.vm("bulky")
    # Real data to copy, so the copy takes long enough to be interrupted.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", source["disks"][0]["path"]],
        check=True,
        capture_output=True,
    )
    vms_dir = hive.data_dir / "vms"
    job = hive.cli("vm", "clone", "bulky", "bulky2", "--full", "--no-wait", "-o", "json").json()
    wait_for(lambda: 0 < _job_progress(hive, job["id"]) < 80, 60, "the copy to be under way", 0.02)
    hive.kill_daemon()
    half_made = [d for d in vms_dir.iterdir() if d.name != source["uuid"]]
    assert len(half_made) == 1 and (half_made[0] / "disk0.qcow2").exists()
    wait_for(lambda: not _processes_using(str(half_made[0])), 10, "qemu-img to die with the daemon")

    hive.start()
    assert [vm["name"] for vm in hive.cli("vm", "list", "-o", "json").json()] == ["bulky"]
    assert [d.name for d in vms_dir.iterdir()] == [source["uuid"]]
    ended = hive.cli("job", "show", job["id"], "-o", "json").json()
    assert ended["state"] == "failed" and "interrupted" in ended["error"]
    # The source is untouched and can be cloned again.
    hive.cli("vm", "clone", "bulky", "bulky2", "--full")
    assert hive.vm("bulky2")["disks"][0]["source"] == "copy"
