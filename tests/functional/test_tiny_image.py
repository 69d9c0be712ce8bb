"""Boot the tiny guest image with plain qemu-system-x86_64 (TCG) processes.

Checks, for BIOS (i440fx + IDE), UEFI (q35 + OVMF + virtio-blk) and direct
kernel boot: the guest prints the ready marker on ttyS0, the serial root shell
answers, DHCP configures the NIC, and an ACPI power-down (QMP system_powerdown)
makes QEMU exit by itself after a clean unmount of the root filesystem.

Every wait has a deadline; QEMU is killed in teardown; the cached image is
never written (each boot uses a qcow2 overlay in tmp_path).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from vmhive.guest.tiny import (
    DIRECT_BOOT_CMDLINE,
    READY_MARKER,
    tiny_image_path,
    tiny_initrd_path,
    tiny_kernel_path,
)

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="qemu-system-x86_64 / qemu-img not installed",
    ),
]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

GUEST_MEMORY = "128"
# OVMF + the Debian kernel's EFI stub crash in the firmware with 128 MiB (seen with
# QEMU 7.2 / OVMF 2022.11, from disk and with -kernel alike); 160 MiB works.
UEFI_GUEST_MEMORY = "256"
BOOT_TIMEOUT = float(os.environ.get("VMHIVE_TEST_BOOT_TIMEOUT", "120"))
COMMAND_TIMEOUT = 30.0
DHCP_TIMEOUT = 60.0
POWERDOWN_TIMEOUT = 60.0
SLIRP_GUEST_ADDRESS = "10.0.2.15"  # QEMU user networking hands out this address

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class GuestError(AssertionError):
    pass


class Guest:
    """A QEMU process with its serial console and QMP sockets."""

    def __init__(
        self, name: str, argv: Sequence[str], workdir: Path, memory: str = GUEST_MEMORY
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.serial_path = workdir / f"{name}.serial.sock"
        self.qmp_path = workdir / f"{name}.qmp.sock"
        self.serial_log = workdir / f"{name}.serial.log"
        self.stderr_path = workdir / f"{name}.qemu.stderr"
        for path in (self.serial_path, self.qmp_path):
            path.unlink(missing_ok=True)
        self.argv = [
            QEMU,
            "-accel",
            "tcg",
            "-m",
            memory,
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-chardev",
            f"socket,id=ser0,path={self.serial_path},server=on,wait=off,logfile={self.serial_log}",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *argv,
        ]
        self.buffer = bytearray()
        self.started = time.monotonic()
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self.serial = self._connect(self.serial_path, deadline=time.monotonic() + 30)

    # ----------------------------------------------------------------- plumbing

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited early ({self.proc.returncode}):\n{self.diag()}")
            if path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(os.fspath(path))
                    return sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU socket {path} did not appear:\n{self.diag()}")
            time.sleep(0.02)

    def diag(self) -> str:
        def tail(path: Path, limit: int = 3000) -> str:
            try:
                return path.read_bytes()[-limit:].decode(errors="replace")
            except OSError:
                return "<none>"

        return (
            f"--- argv: {' '.join(self.argv)}\n"
            f"--- qemu stderr:\n{tail(self.stderr_path)}\n"
            f"--- serial log tail:\n{tail(self.serial_log)}"
        )

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.serial], [], [], max(timeout, 0))
        if ready:
            data = self.serial.recv(65536)
            if not data:
                raise GuestError(f"serial console closed (QEMU exited?):\n{self.diag()}")
            self.buffer += data

    def lines(self, start: int = 0) -> list[str]:
        text = _ANSI.sub(b"", bytes(self.buffer[start:])).replace(b"\r", b"")
        return text.decode(errors="replace").split("\n")

    def wait_line(
        self, predicate: Callable[[str], bool], timeout: float, start: int = 0, what: str = ""
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            # only complete lines count
            for line in self.lines(start)[:-1]:
                if predicate(line.strip()):
                    return line.strip()
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited while waiting for {what}:\n{self.diag()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(
                    f"timed out after {timeout:.0f}s waiting for {what}:\n{self.diag()}"
                )
            self._pump(min(remaining, 0.5))

    def send(self, text: str) -> None:
        self.serial.sendall(text.encode())

    # ------------------------------------------------------------------- guest

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the ready marker; return the seconds since QEMU started."""
        self.wait_line(lambda line: line == READY_MARKER, timeout, what=READY_MARKER)
        return time.monotonic() - self.started

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, list[str]]:
        """Run a shell command on the serial console; return (exit status, output lines)."""
        token = f"{time.monotonic_ns():x}"
        start = len(self.buffer)
        # The quotes keep the markers as printed out of the echoed command line.
        self.send(f"echo B''{token}; {command}; echo E''{token} $?\n")
        self.wait_line(lambda line: line == f"B{token}", timeout, start, f"start of {command!r}")
        end = self.wait_line(
            lambda line: line.startswith(f"E{token} "), timeout, start, f"end of {command!r}"
        )
        lines = [ln.strip() for ln in self.lines(start)]
        begin = lines.index(f"B{token}")
        finish = lines.index(end, begin)
        return int(end.split()[1]), [ln for ln in lines[begin + 1 : finish] if ln]

    def qmp(self, *commands: str, timeout: float = 10.0) -> list[dict[str, object]]:
        """Run QMP commands (after qmp_capabilities); return their 'return' values."""
        deadline = time.monotonic() + timeout
        sock = self._connect(self.qmp_path, deadline)
        results: list[dict[str, object]] = []
        try:
            stream = sock.makefile("rwb", buffering=0)
            sock.settimeout(timeout)

            def reply() -> dict[str, object]:
                while True:
                    line = stream.readline()
                    if not line:
                        raise GuestError("QMP connection closed")
                    msg = json.loads(line)
                    if "return" in msg or "error" in msg:
                        return dict(msg)

            greeting = json.loads(stream.readline())
            assert "QMP" in greeting
            for command in ("qmp_capabilities", *commands):
                stream.write(json.dumps({"execute": command}).encode() + b"\n")
                msg = reply()
                if "error" in msg:
                    raise GuestError(f"QMP {command} failed: {msg['error']}")
                results.append(msg)
        finally:
            sock.close()
        return results[1:]

    def powerdown(self, timeout: float = POWERDOWN_TIMEOUT) -> float:
        """ACPI power button via QMP; wait for QEMU to exit; return seconds taken."""
        start = time.monotonic()
        self.qmp("system_powerdown")
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"QEMU still running {timeout:.0f}s after system_powerdown:\n{self.diag()}"
            ) from None
        if rc != 0:
            raise GuestError(f"QEMU exited with {rc} after system_powerdown:\n{self.diag()}")
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.serial.close()


class StartGuest(Protocol):
    def __call__(self, name: str, argv: Sequence[str], memory: str = ...) -> Guest: ...


@pytest.fixture
def start_guest(tmp_path: Path) -> Iterator[StartGuest]:
    guests: list[Guest] = []

    def start(name: str, argv: Sequence[str], memory: str = GUEST_MEMORY) -> Guest:
        guest = Guest(name, argv, tmp_path, memory)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.kill()


def _overlay(image: Path, tmp_path: Path, name: str = "overlay.qcow2") -> Path:
    overlay = tmp_path / name
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
        check=True,
        timeout=60,
    )
    return overlay


def _root_fs_header(overlay: Path, tmp_path: Path) -> str:
    """dumpe2fs -h of partition 2 (the ext4 root) of a qcow2 disk."""
    raw = tmp_path / "check.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(raw)],
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


def _report(record_property: Callable[[str, object], None], key: str, seconds: float) -> None:
    record_property(key, round(seconds, 2))
    print(f"{key}: {seconds:.1f}s")


def _netdev(model: str) -> list[str]:
    # restrict=on: QEMU's built-in DHCP works, nothing leaves the VM
    return ["-netdev", "user,id=net0,restrict=on", "-device", f"{model},netdev=net0,romfile="]


def test_gen1_bios_ide_boot(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    overlay = _overlay(tiny_image_path(tiny_image_dir), tmp_path)
    guest = start_guest(
        "gen1",
        [
            "-machine",
            "pc",
            "-drive",
            f"file={overlay},if=ide,format=qcow2",
            *_netdev("e1000"),
        ],
    )
    _report(record_property, "gen1_boot_seconds", guest.wait_ready())
    _check_shell_and_network(guest, "eth0")
    _check_udhcpc_script(guest, "eth0")
    _report(record_property, "gen1_powerdown_seconds", guest.powerdown())
    header = _root_fs_header(overlay, tmp_path)
    assert re.search(r"^Filesystem state:\s+clean$", header, re.M), header
    assert "needs_recovery" not in header, "root fs was not unmounted cleanly"


@pytest.mark.skipif(
    not (OVMF_CODE.is_file() and OVMF_VARS.is_file()), reason="OVMF (4M) not installed"
)
def test_gen2_uefi_virtio_boot(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    overlay = _overlay(tiny_image_path(tiny_image_dir), tmp_path)
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    guest = start_guest(
        "gen2",
        [
            "-machine",
            "q35",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-drive",
            f"file={overlay},if=none,id=disk0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
            *_netdev("virtio-net-pci"),
        ],
        memory=UEFI_GUEST_MEMORY,
    )
    _report(record_property, "gen2_boot_seconds", guest.wait_ready())
    _check_shell_and_network(guest, "eth0")
    rc, out = guest.run("ls /sys/firmware/efi")
    assert rc == 0 and out, "guest did not boot through UEFI"
    _report(record_property, "gen2_powerdown_seconds", guest.powerdown())


def test_direct_kernel_boot_and_persistence(
    tiny_image_dir: Path,
    tmp_path: Path,
    start_guest: StartGuest,
    record_property: Callable[[str, object], None],
) -> None:
    overlay = _overlay(tiny_image_path(tiny_image_dir), tmp_path)
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
        f"file={overlay},if=virtio,format=qcow2",
    ]
    guest = start_guest("direct", argv)
    _report(record_property, "direct_boot_seconds", guest.wait_ready())
    rc, out = guest.run("echo persisted-$((6 * 7)) > /root/marker; sync; cat /root/marker")
    assert rc == 0 and out == ["persisted-42"], out
    _report(record_property, "direct_powerdown_seconds", guest.powerdown())

    # A second boot of the same overlay sees the file written before power-off.
    again = start_guest("direct2", argv)
    again.wait_ready()
    rc, out = again.run("cat /root/marker")
    assert rc == 0 and out == ["persisted-42"], out
    again.powerdown()
