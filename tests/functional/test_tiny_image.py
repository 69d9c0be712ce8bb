"""Boot the tiny guest image with plain qemu-system-x86_64 (TCG) processes.

Checks, for BIOS (i440fx + IDE), UEFI (q35 + OVMF + virtio-blk) and direct
kernel boot: the guest prints the ready marker on ttyS0, the serial root shell
answers, DHCP configures the NIC, and an ACPI power-down (QMP system_powerdown)
makes QEMU exit by itself after a clean unmount of the root filesystem.

Every wait has a deadline; QEMU is killed in teardown; the cached image is
never written (each boot uses a qcow2 overlay in tmp_path).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.functional.qemu_boot import (
    COMMAND_TIMEOUT,
    HAVE_OVMF,
    HAVE_QEMU,
    SLIRP_GUEST_ADDRESS,
    Guest,
    StartGuest,
    guest_factory,
    netdev,
    overlay,
    report,
    uefi_pflash,
)
from vmhive.guest.tiny import (
    DIRECT_BOOT_CMDLINE,
    READY_MARKER,
    tiny_image_path,
    tiny_initrd_path,
    tiny_kernel_path,
)

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 / qemu-img not installed"),
]

# OVMF + the Debian kernel's EFI stub crash in the firmware with 128 MiB (seen with
# QEMU 7.2 / OVMF 2022.11, from disk and with -kernel alike); 160 MiB works.
UEFI_GUEST_MEMORY = "256"
BOOT_TIMEOUT = float(os.environ.get("VMHIVE_TEST_BOOT_TIMEOUT", "120"))
DHCP_TIMEOUT = 60.0


@pytest.fixture
def start_guest(tmp_path: Path) -> Iterator[StartGuest]:
    with guest_factory(tmp_path) as start:
        yield start


def _wait_ready(guest: Guest, timeout: float = BOOT_TIMEOUT) -> float:
    """Wait for the tiny guest's ready marker; return the seconds since QEMU started."""
    return guest.wait_marker(READY_MARKER, timeout)


def _root_fs_header(disk: Path, tmp_path: Path) -> str:
    """dumpe2fs -h of partition 2 (the ext4 root) of a qcow2 disk."""
    raw = tmp_path / "check.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)],
        check=True,
        timeout=120,
    )
    table = json.loads(
        subprocess.run(
            ["sfdisk", "-J", str(raw)], check=True, capture_output=True, timeout=30
        ).stdout
    )
    part = table["partitiontable"]["partitions"][1]
    offset = int(part["start"]) * int(table["partitiontable"].get("sectorsize", 512))
    out = subprocess.run(
        ["dumpe2fs", "-h", f"{raw}?offset={offset}"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout.decode()
    raw.unlink()
    return out


def _check_shell_and_network(guest: Guest, iface: str) -> None:
    # plain round trip, as a console user would do it
    start = len(guest.buffer)
    guest.send("echo hello\n")
    guest.wait_line(lambda line: line == "hello", COMMAND_TIMEOUT, start, "echo hello")

    rc, out = guest.run("cat /proc/mounts")
    assert rc == 0
    mounts = {line.split()[1]: line.split() for line in out if len(line.split()) >= 4}
    assert mounts["/"][2] == "ext4" and "rw" in mounts["/"][3].split(","), mounts.get("/")
    for point, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs")):
        assert mounts[point][2] == fstype, out
    assert mounts["/tmp"][2] == "tmpfs", out

    rc, _ = guest.run("echo written > /root/probe && sync && grep -q written /root/probe")
    assert rc == 0, "root filesystem is not writable"

    deadline = time.monotonic() + DHCP_TIMEOUT
    while True:
        rc, out = guest.run(f"ip -4 -o addr show dev {iface}")
        if any(SLIRP_GUEST_ADDRESS in line for line in out):
            break
        assert time.monotonic() < deadline, f"no DHCP address on {iface}: {out}\n{guest.diag()}"
        time.sleep(1)
    rc, out = guest.run(f"cat /run/udhcpc/{iface}.log")
    assert any(f"lease of {SLIRP_GUEST_ADDRESS} obtained" in line for line in out), out


def _check_udhcpc_script(guest: Guest, iface: str) -> None:
    # restrict=on user networking offers no router/DNS: feed the script a full lease.
    rc, out = guest.run(
        f"interface={iface} ip={SLIRP_GUEST_ADDRESS} mask=24 router=10.0.2.2 dns=10.0.2.3"
        " domain=example.test /etc/udhcpc/default.script renew >/dev/null"
        " && ip route show && cat /etc/resolv.conf"
    )
    assert rc == 0, out
    assert any(line.startswith("default via 10.0.2.2") for line in out), out
    assert "nameserver 10.0.2.3" in out and "search example.test" in out, out


def test_gen1_bios_ide_boot(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    disk = overlay(tiny_image_path(tiny_image_dir), tmp_path)
    guest = start_guest(
        "gen1",
        [
            "-machine",
            "pc",
            "-drive",
            f"file={disk},if=ide,format=qcow2",
            *netdev("e1000"),
        ],
    )
    report(record_property, "gen1_boot_seconds", _wait_ready(guest))
    _check_shell_and_network(guest, "eth0")
    _check_udhcpc_script(guest, "eth0")
    report(record_property, "gen1_powerdown_seconds", guest.powerdown())
    header = _root_fs_header(disk, tmp_path)
    assert re.search(r"^Filesystem state:\s+clean$", header, re.M), header
    assert "needs_recovery" not in header, "root fs was not unmounted cleanly"


@pytest.mark.skipif(not HAVE_OVMF, reason="OVMF (4M) not installed")
def test_gen2_uefi_virtio_boot(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    disk = overlay(tiny_image_path(tiny_image_dir), tmp_path)
    guest = start_guest(
        "gen2",
        [
            "-machine",
            "q35",
            *uefi_pflash(tmp_path),
            "-drive",
            f"file={disk},if=none,id=disk0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
            *netdev("virtio-net-pci"),
        ],
        memory=UEFI_GUEST_MEMORY,
    )
    report(record_property, "gen2_boot_seconds", _wait_ready(guest))
    _check_shell_and_network(guest, "eth0")
    rc, out = guest.run("ls /sys/firmware/efi")
    assert rc == 0 and out, "guest did not boot through UEFI"
    report(record_property, "gen2_powerdown_seconds", guest.powerdown())


def test_direct_kernel_boot_and_persistence(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    disk = overlay(tiny_image_path(tiny_image_dir), tmp_path)
    argv = [
        "-machine",
        "pc",
        "-kernel",
        str(tiny_kernel_path(tiny_image_dir)),
        "-initrd",
        str(tiny_initrd_path(tiny_image_dir)),
        "-append",
        DIRECT_BOOT_CMDLINE,
        "-drive",
        f"file={disk},if=virtio,format=qcow2",
    ]
    guest = start_guest("direct", argv)
    report(record_property, "direct_boot_seconds", _wait_ready(guest))
    rc, out = guest.run("echo persisted-$((6 * 7)) > /root/marker; sync; cat /root/marker")
    assert rc == 0 and out == ["persisted-42"], out
    report(record_property, "direct_powerdown_seconds", guest.powerdown())

    # A second boot of the same overlay sees the file written before power-off.
    again = start_guest("direct2", argv)
    _wait_ready(again)
    rc, out = again.run("cat /root/marker")
    assert rc == 0 and out == ["persisted-42"], out
    again.powerdown()
