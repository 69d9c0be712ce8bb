"""VM lifecycle against real QEMU (TCG here), driven through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.functional.hive import Hive, wait_for

pytestmark = pytest.mark.functional


@pytest.mark.parametrize("generation", [1, 2])
def test_boot_console_and_graceful_stop(hive: Hive, generation: int) -> None:
    name = f"boot-gen{generation}"
    created = hive.create_tiny(name, generation)
    assert created["state"] == "stopped"
    assert created["machine"].startswith("pc-i440fx-" if generation == 1 else "pc-q35-")

    hive.cli("vm", "start", name)
    vm = hive.vm(name)
    assert vm["state"] == "running" and vm["desired_state"] == "running"
    assert vm["accel"] == "tcg"
    pid = vm["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"qemu-system-x86_64")

    hive.wait_ready(name)
    # The guest sees the disk on the bus its generation promises.
    disks = hive.run_in_guest(name, "ls /sys/block")
    assert ("sda" if generation == 1 else "vda") in disks.split()
    assert hive.run_in_guest(name, "echo $((6 * 7))") == "42"
    # The interactive console, as a person uses it: type, read, Ctrl-] to detach.
    seen = hive.interactive_console(name, b"echo hello-$((40 + 2))\r", b"hello-42")
    assert b"hello-42" in seen and b"Detached" in seen
    # The guest keeps running after a detach.
    assert hive.vm(name)["state"] == "running"

    stopped = hive.cli("vm", "stop", name, "--output", "json").json()
    assert stopped["state"] == "succeeded"
    log = [line["message"] for line in stopped["log"]]
    assert "the guest powered off" in log, log
    vm = hive.vm(name)
    assert vm["state"] == "stopped" and vm["desired_state"] == "stopped" and vm["pid"] is None
    assert vm["state_reason"] == "the guest powered off at the ACPI power button"
    assert not Path(f"/proc/{pid}").exists()
    hive.cli("vm", "delete", name)


def test_pause_resume_reboot_and_guest_poweroff(hive: Hive) -> None:
    name = "pauser"
    hive.create_tiny(name, 2, "--start")
    hive.wait_ready(name)

    hive.cli("vm", "pause", name)
    assert hive.vm(name)["state"] == "paused"
    paused = hive.cli("vm", "pause", name, check=False)
    assert paused.rc != 0 and "already paused" in paused.err and paused.err.count("\n") == 1
    hive.cli("vm", "resume", name)
    assert hive.vm(name)["state"] == "running"
    assert hive.run_in_guest(name, "echo alive") == "alive"

    pid = hive.vm(name)["pid"]
    hive.cli("vm", "reboot", name)
    vm = hive.vm(name)
    assert vm["state"] == "running" and vm["pid"] != pid
    hive.wait_ready(name, count=2)

    # A guest that powers itself off is stopped, and that is now what is desired.
    hive.run_in_guest_nowait(name, "poweroff")
    vm = hive.wait_state(name, "stopped", timeout=120)
    assert vm["desired_state"] == "stopped"
    assert "guest powered itself off" in vm["state_reason"]
    hive.cli("vm", "delete", name)


def test_killed_qemu_is_crashed_with_reason(hive: Hive) -> None:
    name = "victim"
    hive.create_tiny(name, 1, "--start")
    pid = hive.vm(name)["pid"]
    os.kill(pid, signal.SIGKILL)
    vm = hive.wait_state(name, "crashed")
    assert "SIGKILL" in vm["state_reason"]
    assert vm["desired_state"] == "running" and vm["pid"] is None
    # A crashed VM can be started again.
    hive.cli("vm", "start", name)
    assert hive.vm(name)["state"] == "running"
    hive.cli("vm", "force-stop", name)
    assert hive.vm(name)["state"] == "stopped"
    hive.cli("vm", "delete", name)


def test_delete_leaves_nothing_behind(hive: Hive) -> None:
    name = "ephemeral"
    vm = hive.create_tiny(name, 2, "--start")
    vm = hive.vm(name)
    pid = vm["pid"]
    vm_dir = hive.data_dir / "vms" / vm["uuid"]
    run_dir = hive.data_dir / "run" / vm["uuid"]
    assert (vm_dir / "disk0.qcow2").exists() and (vm_dir / "OVMF_VARS.fd").exists()
    assert (run_dir / "qmp.sock").exists() and (run_dir / "serial.sock").exists()

    refused = hive.cli("vm", "delete", name, check=False)
    assert refused.rc == 1 and "is running" in refused.err
    assert hive.vm(name)["state"] == "running"

    hive.cli("vm", "delete", name, "--force")
    assert not vm_dir.exists() and not run_dir.exists()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "QEMU to be gone")
    gone = hive.cli("vm", "show", name, check=False)
    assert gone.rc == 1 and "no VM named" in gone.err
    assert pid not in hive.qemu_pids()
    # The shared image is untouched.
    assert (hive.image_dir / "tiny.qcow2").exists()


def test_edit_while_stopped_only(hive: Hive) -> None:
    name = "editme"
    hive.create_tiny(name, 1)
    hive.cli("vm", "edit", name, "--vcpus", "2", "--memory", "160", "--description", "hi")
    vm = hive.vm(name)
    assert (vm["vcpus"], vm["memory_mib"], vm["description"]) == (2, 160, "hi")
    hive.cli("vm", "start", name)
    refused = hive.cli("vm", "edit", name, "--memory", "192", check=False)
    assert refused.rc == 1 and "must be stopped" in refused.err
    assert hive.vm(name)["memory_mib"] == 160
    hive.cli("vm", "edit", name, "--description", "live edit of text is fine")
    # The running QEMU got what was configured.
    argv = Path(f"/proc/{hive.vm(name)['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"size=160M" in argv and b"2,sockets=1,cores=2,threads=1" in argv
    hive.cli("vm", "delete", name, "--force")


def test_cdrom_with_an_iso(hive: Hive, tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("from the cd\n")
    iso_dir = hive.data_dir / "iso"
    iso_dir.mkdir(exist_ok=True)
    iso = iso_dir / "hello.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-V", "VMHIVETEST", "-o", str(iso), str(content)],
        check=True,
    )
    name = "cdreader"
    hive.create_tiny(name, 1, "--iso", str(iso), "--boot-order", "disk,cdrom", "--start")
    vm = hive.vm(name)
    assert vm["cdroms"] == [{"index": 0, "iso": str(iso)}]
    assert vm["boot_order"] == "disk,cdrom"
    hive.wait_ready(name)
    out = hive.run_in_guest(
        name, "mkdir -p /tmp/cd && mount -r /dev/sr0 /tmp/cd && cat /tmp/cd/hello.txt"
    )
    assert out.splitlines()[-1] == "from the cd"
    hive.cli("vm", "delete", name, "--force")
    assert iso.exists(), "deleting a VM never deletes the ISO it used"


def test_direct_kernel_boot(hive: Hive) -> None:
    images = hive.image_dir
    cmdline = "console=ttyS0,115200 root=LABEL=vmhive-root quiet vmhive.test=direct"
    name = "kernelboot"
    hive.create_tiny(
        name, 2, "--kernel", str(images / "vmlinuz"), "--initrd", str(images / "initrd.img"),
        "--cmdline", cmdline, "--start",
    )  # fmt: skip
    hive.wait_ready(name)
    # OVMF's loader appends "initrd=initrd"; our command line comes first, whole.
    assert hive.run_in_guest(name, "cat /proc/cmdline").startswith(cmdline)
    # Gen 2 boots the kernel through OVMF.
    assert hive.run_in_guest(name, "test -d /sys/firmware/efi && echo uefi") == "uefi"
    hive.cli("vm", "delete", name, "--force")
