"""Validation of user input, and translation of a stored VM into a VmSpec."""

from __future__ import annotations

import random
from pathlib import Path

from vmhive.config import Settings
from vmhive.hypervisor.spec import (
    MAC_RE,
    NAME_RE,
    Accel,
    BootDevice,
    CdromSpec,
    DiskSpec,
    Firmware,
    KernelBoot,
    NicSpec,
    RuntimePaths,
    VmSpec,
)
from vmhive.network.names import tap_name
from vmhive.services.errors import InvalidRequest
from vmhive.services.host import OVMF_CODE
from vmhive.store.models import Vm

MAX_VCPUS = 64
MIN_MEMORY_MIB = 32
# OVMF (Debian 12's edk2) with a Linux EFI stub crashes in firmware below
# about 160 MiB (measured with the tiny guest under TCG); refuse rather than hang.
MIN_MEMORY_MIB_UEFI = 192
MAX_MEMORY_MIB = 1024 * 1024
VARS_FILE = "OVMF_VARS.fd"
SEED_FILE = "cidata.iso"


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid VM name {name!r}: use 1-63 lower-case letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )


def check_resources(vcpus: int, memory_mib: int, generation: int = 1) -> None:
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidRequest(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise InvalidRequest(
            f"memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {memory_mib}"
        )
    if generation == 2 and memory_mib < MIN_MEMORY_MIB_UEFI:
        raise InvalidRequest(
            f"memory must be at least {MIN_MEMORY_MIB_UEFI} MiB for a generation 2 (UEFI) VM, "
            f"got {memory_mib}: the OVMF firmware fails below that"
        )


def parse_boot_order(text: str) -> tuple[BootDevice, ...]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    try:
        order = tuple(BootDevice(item) for item in items)
    except ValueError:
        raise InvalidRequest(
            f"invalid boot order {text!r}: use a comma-separated list of disk, cdrom, network"
        ) from None
    if not order or len(set(order)) != len(order):
        raise InvalidRequest(f"invalid boot order {text!r}: list each device once")
    return order


def check_path_under(path_text: str, roots: list[Path], what: str) -> Path:
    """Resolve a user-given path and insist that it lies in one of the allowed roots."""
    if "\0" in path_text or "\n" in path_text:
        raise InvalidRequest(f"invalid {what} path")
    path = Path(path_text).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise InvalidRequest(f"{what} {path_text} is outside the allowed directories ({allowed})")
    if not path.is_file():
        raise InvalidRequest(f"{what} {path_text} does not exist")
    return path


def random_mac(taken: set[str]) -> str:
    while True:
        mac = "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            return mac


def check_mac(mac: str) -> str:
    mac = mac.lower()
    if not MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise InvalidRequest(
            f"invalid MAC address {mac!r}: use a unicast address like 52:54:00:12:34:56"
        )
    return mac


def vm_dir(settings: Settings, vm: Vm) -> Path:
    return settings.vms_dir / vm.uuid


def runtime_paths(settings: Settings, vm_uuid: str) -> RuntimePaths:
    return RuntimePaths(settings.run_root / vm_uuid)


def build_spec(settings: Settings, vm: Vm, accel: str) -> VmSpec:
    firmware = None
    if vm.generation == 2:
        firmware = Firmware(code=OVMF_CODE, vars=vm_dir(settings, vm) / VARS_FILE)
    kernel_boot = None
    if vm.kernel:
        kernel_boot = KernelBoot(
            kernel=Path(vm.kernel),
            initrd=Path(vm.initrd) if vm.initrd else None,
            cmdline=vm.cmdline or "",
        )
    return VmSpec(
        name=vm.name,
        uuid=vm.uuid,
        generation=vm.generation,
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        machine=vm.machine,
        accel=Accel(accel),
        runtime=runtime_paths(settings, vm.uuid),
        disks=tuple(DiskSpec(path=Path(d.path), format=d.format) for d in vm.disks),
        cdroms=tuple(CdromSpec(iso=Path(c.iso) if c.iso else None) for c in vm.cdroms)
        + ((CdromSpec(iso=vm_dir(settings, vm) / SEED_FILE),) if vm.cloudinit else ()),
        nics=nic_specs(vm),
        boot_order=parse_boot_order(vm.boot_order),
        kernel_boot=kernel_boot,
        firmware=firmware,
    )


def nic_specs(vm: Vm) -> tuple[NicSpec, ...]:
    """A tap NIC's TAP is named after the VM and the NIC's index (`vmhive.network`)."""
    return tuple(
        NicSpec(
            mac=n.mac,
            model=n.model,
            backend=n.backend,
            tap=tap_name(vm.uuid, n.index) if n.backend == "tap" else None,
        )
        for n in vm.nics
    )


def resolve_iso(settings: Settings, text: str) -> Path:
    """An ISO by its name in the library (<data-dir>/iso), or by an allowed path."""
    library = settings.data_dir / "iso"
    if "/" not in text and (library / text).is_file():
        return library / text
    return check_path_under(text, [library, settings.images], "ISO")
