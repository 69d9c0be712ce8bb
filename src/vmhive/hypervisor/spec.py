"""The hardware description of one VM, as the hypervisor driver sees it.

A `VmSpec` is plain, immutable data: everything needed to build the QEMU
command line and nothing about the database or jobs. The services layer turns
a stored VM into a spec; `hypervisor.qemu.argv.build_argv` turns a spec into
argv. Keeping it pure lets the argv builder be golden-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class BootDevice(StrEnum):
    DISK = "disk"
    CDROM = "cdrom"
    NETWORK = "network"


@dataclass(frozen=True)
class DiskSpec:
    """One disk image attached to the VM. The bus follows from the generation."""

    path: Path
    format: str = "qcow2"
    read_only: bool = False


@dataclass(frozen=True)
class CdromSpec:
    """One CD-ROM drive; `iso` is None for an empty drive."""

    iso: Path | None = None


@dataclass(frozen=True)
class NicSpec:
    """One network interface.

    `backend` is "user" (QEMU's user-mode NAT) or "tap": the host TAP device named
    `tap`, which must exist before QEMU starts (`vmhive.network.ensure_tap` creates
    it, attached to its network's bridge); QEMU opens it by name and runs no scripts.
    """

    mac: str
    model: str | None = None  # None: the generation's default (e1000 / virtio-net-pci)
    backend: str = "user"
    tap: str | None = None  # backend "tap": the TAP's interface name


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: QEMU loads the kernel itself, skipping the bootloader."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class Firmware:
    """UEFI firmware for generation 2: read-only code and the VM's own variables copy."""

    code: Path
    vars: Path


@dataclass(frozen=True)
class RuntimePaths:
    """Where a running VM's sockets, pidfile and logs live (one directory per VM)."""

    run_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.run_dir / "vnc.sock"

    @property
    def qga_socket(self) -> Path:
        """The guest agent's virtio-serial port (org.qemu.guest_agent.0)."""
        return self.run_dir / "qga.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "qemu.log"


@dataclass(frozen=True)
class VmSpec:
    """Everything the driver needs to run one VM."""

    name: str
    uuid: str
    generation: int  # 1 = i440fx + SeaBIOS + IDE/e1000; 2 = q35 + OVMF + virtio
    vcpus: int
    memory_mib: int
    machine: str  # pinned machine type, e.g. "pc-q35-7.2" or "pc-i440fx-7.2"
    accel: Accel
    runtime: RuntimePaths
    disks: tuple[DiskSpec, ...] = ()
    cdroms: tuple[CdromSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    boot_order: tuple[BootDevice, ...] = (BootDevice.DISK, BootDevice.CDROM, BootDevice.NETWORK)
    kernel_boot: KernelBoot | None = None
    firmware: Firmware | None = None  # required for generation 2
