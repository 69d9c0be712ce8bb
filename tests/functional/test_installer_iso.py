"""Install the tiny guest from its installer ISO onto a blank disk (real QEMU, TCG).

gen1: i440fx + SeaBIOS, ISO and disk on IDE; gen2: q35 + OVMF, ISO on the AHCI
bus, disk on virtio-blk. Each boots the ISO, waits for the installer's start
and done markers and for QEMU to exit by itself (the installer powers off),
checks that the disk holds exactly the tiny image, then boots the disk alone
and waits for the guest's ready marker. Disks that are not blank or too small
must be refused and left alone.

Every wait has a deadline; QEMU is killed in teardown; all disks are fresh
files in tmp_path (the cached tiny image is only read).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from vmhive.guest.installer import (
    DONE_MARKER,
    ERROR_PREFIX,
    START_MARKER,
)
from vmhive.guest.tiny import READY_MARKER, tiny_image_path

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="qemu-system-x86_64 / qemu-img not installed",
    ),
    pytest.mark.timeout(900),
]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

BIOS_MEMORY = "192"
UEFI_MEMORY = "256"  # OVMF fails below ~160 MiB
BOOT_TIMEOUT = float(os.environ.get("VMHIVE_TEST_BOOT_TIMEOUT", "120"))
INSTALL_TIMEOUT = float(os.environ.get("VMHIVE_TEST_INSTALL_TIMEOUT", "300"))
DISK_MIB = 512

_ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")


class VmError(AssertionError):
    pass


class Vm:
    """A QEMU process whose serial console goes to a log file."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, memory: str) -> None:
        self.serial_log = workdir / f"{name}.serial.log"
        self.stderr_path = workdir / f"{name}.qemu.stderr"
        self.serial_log.unlink(missing_ok=True)
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
            "-serial",
            f"file:{self.serial_log}",
            *argv,
        ]
        self.started = time.monotonic()
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )

    def lines(self) -> list[str]:
        """Complete lines of the serial console so far, without terminal escapes."""
        try:
            text = self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [_ANSI.sub("", line).replace("\r", "").strip() for line in text.split("\n")[:-1]]

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

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Wait for a console line matching *predicate*; return it."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # read the log after checking
            for line in self.lines():
                if predicate(line):
                    return line
            if exited:
                raise VmError(f"QEMU exited ({self.proc.returncode}) before {what}:\n{self.diag()}")
            if time.monotonic() > deadline:
                raise VmError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.diag()}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmError(f"QEMU still running after {timeout:.0f}s:\n{self.diag()}") from None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class StartVm(Protocol):
    def __call__(self, name: str, argv: Sequence[str], memory: str) -> Vm: ...


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[StartVm]:
    vms: list[Vm] = []

    def start(name: str, argv: Sequence[str], memory: str) -> Vm:
        vm = Vm(name, argv, tmp_path, memory)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.kill()


def _qemu_img(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *args], check=False, capture_output=True, timeout=timeout)


def _blank_disk(path: Path, size_mib: int = DISK_MIB) -> Path:
    proc = _qemu_img("create", "-q", "-f", "qcow2", str(path), f"{size_mib}M")
    assert proc.returncode == 0, proc.stderr.decode()
    return path


def _same_content(a: Path, b: Path) -> tuple[bool, str]:
    """qemu-img compare: equal guest-visible content (a larger image's extra area all zeros)."""
    proc = _qemu_img("compare", "-q", str(a), str(b), timeout=300)
    return proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def _report(record_property: Callable[[str, object], None], key: str, seconds: float) -> None:
    record_property(key, round(seconds, 2))
    print(f"{key}: {seconds:.1f}s")


def _install(start_vm: StartVm, name: str, argv: Sequence[str], memory: str) -> tuple[Vm, float]:
    """Boot the installer; wait for start, done and the power-off. Return (vm, seconds)."""
    vm = start_vm(name, ["-no-reboot", *argv], memory)
    vm.wait_line(lambda line: line == START_MARKER, INSTALL_TIMEOUT, START_MARKER)
    line = vm.wait_line(
        lambda line: line == DONE_MARKER or line.startswith(ERROR_PREFIX),
        INSTALL_TIMEOUT,
        f"{DONE_MARKER} or {ERROR_PREFIX}",
    )
    assert line == DONE_MARKER, f"installer failed: {line}\n{vm.diag()}"
    rc = vm.wait_exit(60)
    assert rc == 0, f"QEMU exited with {rc}:\n{vm.diag()}"
    return vm, vm.elapsed()


def test_gen1_bios_install_from_iso(
    tiny_image_dir: Path,
    installer_iso: Path,
    tmp_path: Path,
    start_vm: StartVm,
    record_property: Callable[[str, object], None],
) -> None:
    disk = _blank_disk(tmp_path / "gen1.qcow2")
    _, seconds = _install(
        start_vm,
        "gen1-install",
        [
            "-machine",
            "pc",
            "-drive",
            f"file={disk},if=ide,index=0,format=qcow2",
            "-drive",
            f"file={installer_iso},if=ide,index=2,media=cdrom,format=raw,readonly=on",
            "-boot",
            "d",
        ],
        BIOS_MEMORY,
    )
    _report(record_property, "gen1_install_seconds", seconds)
    same, out = _same_content(tiny_image_path(tiny_image_dir), disk)
    assert same, f"the installed disk differs from the tiny image: {out}"

    vm = start_vm(
        "gen1-disk",
        ["-machine", "pc", "-drive", f"file={disk},if=ide,index=0,format=qcow2"],
        BIOS_MEMORY,
    )
    vm.wait_line(lambda line: line == READY_MARKER, BOOT_TIMEOUT, READY_MARKER)
    _report(record_property, "gen1_disk_boot_seconds", vm.elapsed())


@pytest.mark.skipif(
    not (OVMF_CODE.is_file() and OVMF_VARS.is_file()), reason="OVMF (4M) not installed"
)
def test_gen2_uefi_install_from_iso(
    tiny_image_dir: Path,
    installer_iso: Path,
    tmp_path: Path,
    start_vm: StartVm,
    record_property: Callable[[str, object], None],
) -> None:
    disk = _blank_disk(tmp_path / "gen2.qcow2")
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    firmware = [
        "-machine",
        "q35",
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]
    _, seconds = _install(
        start_vm,
        "gen2-install",
        [
            *firmware,
            "-drive",
            f"file={installer_iso},if=none,id=cd0,media=cdrom,format=raw,readonly=on",
            "-device",
            "ide-cd,drive=cd0,bus=ide.0,bootindex=1",
            "-drive",
            f"file={disk},if=none,id=disk0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=disk0",
        ],
        UEFI_MEMORY,
    )
    _report(record_property, "gen2_install_seconds", seconds)
    same, out = _same_content(tiny_image_path(tiny_image_dir), disk)
    assert same, f"the installed disk differs from the tiny image: {out}"

    # Same NVRAM as the install. The disk needs a bootindex: without one OVMF
    # keeps the BootOrder from the install boot, where its EFI shell comes
    # before the (new) disk entry.
    vm = start_vm(
        "gen2-disk",
        [
            *firmware,
            "-drive",
            f"file={disk},if=none,id=disk0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
        ],
        UEFI_MEMORY,
    )
    vm.wait_line(lambda line: line == READY_MARKER, BOOT_TIMEOUT, READY_MARKER)
    _report(record_property, "gen2_disk_boot_seconds", vm.elapsed())


@pytest.mark.parametrize(
    ("case", "size_mib", "reason"),
    [
        ("has-data", DISK_MIB, "no blank disk: /dev/sda has data"),
        ("too-small", 128, "blank disk /dev/sda is too small: 128 MiB < 256 MiB"),
    ],
)
def test_installer_refuses_unsuitable_disk(
    installer_iso: Path,
    tmp_path: Path,
    start_vm: StartVm,
    case: str,
    size_mib: int,
    reason: str,
) -> None:
    disk = _blank_disk(tmp_path / f"{case}.qcow2", size_mib)
    if case == "has-data":
        # something in the middle of the first MiB (not a partition table)
        proc = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 65536 4096", str(disk)],
            check=False,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
    before = tmp_path / f"{case}.before.qcow2"
    shutil.copyfile(disk, before)

    vm = start_vm(
        f"refuse-{case}",
        [
            "-no-reboot",
            "-machine",
            "pc",
            "-drive",
            f"file={disk},if=ide,index=0,format=qcow2",
            "-drive",
            f"file={installer_iso},if=ide,index=2,media=cdrom,format=raw,readonly=on",
            "-boot",
            "d",
        ],
        BIOS_MEMORY,
    )
    vm.wait_line(lambda line: line == START_MARKER, INSTALL_TIMEOUT, START_MARKER)
    line = vm.wait_line(
        lambda line: line == DONE_MARKER or line.startswith(ERROR_PREFIX),
        INSTALL_TIMEOUT,
        ERROR_PREFIX,
    )
    assert line == f"{ERROR_PREFIX} {reason}", f"{line}\n{vm.diag()}"
    rc = vm.wait_exit(60)
    assert rc == 0, f"QEMU exited with {rc}:\n{vm.diag()}"
    same, out = _same_content(before, disk)
    assert same, f"the installer changed a disk it refused: {out}"
