"""The Hyper-V / virt-install flow, through the CLI: blank disk + installer ISO,
install, eject, boot from the disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional

INSTALL_DEADLINE = 300.0


@pytest.mark.parametrize("generation", [1, 2])
def test_install_from_iso_onto_a_blank_disk(
    hive: Hive, installer_iso: Path, generation: int
) -> None:
    library = [i["name"] for i in hive.cli("iso", "list", "-o", "json").json()]
    if "tiny-installer.iso" not in library:
        hive.cli("iso", "import", str(installer_iso))
    name = f"install-gen{generation}"
    memory = "192" if generation == 1 else "256"
    hive.cli(
        "vm", "create", name, "--generation", str(generation), "--memory", memory,
        "--disk-size", "512M", "--iso", "tiny-installer.iso", "--start",
    )  # fmt: skip
    vm = hive.vm(name)
    assert vm["boot_order"] == "cdrom,disk,network" and vm["disks"][0]["source"] == "blank"

    # The installer writes the system, then powers the VM off by itself.
    vm = hive.wait_state(name, "stopped", timeout=INSTALL_DEADLINE)
    assert vm["state_reason"] == "the guest powered itself off"
    console = hive.console_log(name)
    assert "vmhive-installer-done" in console, console[-2000:]
    assert "vmhive-guest-ready" not in console

    hive.cli("vm", "cdrom", "eject", name)
    hive.cli("vm", "start", name)
    hive.wait_ready(name)
    root = hive.run_in_guest(name, "grep ' / ' /proc/mounts")
    assert root.startswith("/dev/sda2" if generation == 1 else "/dev/vda2"), root
    hive.cli("vm", "delete", name, "--force")
