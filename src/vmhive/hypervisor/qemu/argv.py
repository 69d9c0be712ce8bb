"""Translate a `VmSpec` into the argv of a QEMU process (QEMU 7.2, x86_64).

Everything here is pure: no I/O, no environment reads, no clock. The same spec
always gives the same argv, which is what the golden tests in tests/golden/ pin.

Design notes
------------

* The argv is executed directly, never through a shell: each list element is
  exactly one argument, so spaces, quotes and shell metacharacters need no care.
* QEMU's classic option syntax (``key=value,key=value``) treats a comma as a
  separator; a literal comma inside a value is written as two commas
  (`quote_option_value`). Wherever QEMU 7.2 accepts JSON (``-blockdev`` and
  ``-device``) we use JSON instead, so paths in disk images need no escaping.
  The remaining classic options that carry user-influenced values (``-chardev``
  socket paths and ``-vnc``) are escaped; ``-pidfile``, ``-kernel``, ``-append``
  take their argument verbatim.
* Every device gets a stable ``id`` (``disk0``, ``cdrom0``, ``net0``, ``video0``,
  ``serial0``, ``rp0``...) and every disk a stable node name (``disk0`` for the
  format node, ``disk0-file`` for the protocol node), so QMP can address them.
* Generation 1: i440fx + SeaBIOS, disks and CD-ROMs on the PIIX3 IDE controller,
  e1000 NICs and a std VGA on ``pci.0`` at fixed slots.
  Generation 2: q35 + OVMF (pflash), virtio-blk disks, CD-ROMs on the ICH9 AHCI
  ports, virtio-net NICs, each PCI device behind its own ``pcie-root-port`` plus
  spare root ports for later hot-plug (see `pcie_root_ports`).
* Boot order is expressed with ``bootindex`` on devices (no ``-boot``).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from vmhive.hypervisor.spec import (
    MAC_RE,
    NAME_RE,
    Accel,
    BootDevice,
    VmSpec,
)

__all__ = [
    "DEFAULT_NIC_MODEL",
    "DISK_FORMATS",
    "MAX_CDROMS_GEN2",
    "MAX_DISKS_GEN2",
    "MAX_IDE_DEVICES_GEN1",
    "MAX_NICS",
    "MAX_VCPUS",
    "MIN_MEMORY_MIB",
    "NIC_BACKENDS",
    "NIC_MODELS",
    "SPARE_ROOT_PORTS",
    "PcieRootPort",
    "build_argv",
    "pcie_root_ports",
    "quote_option_value",
    "validate_spec",
]

#: Image formats a disk may have (QEMU block driver names).
DISK_FORMATS: Final = frozenset({"qcow2", "raw"})
#: NIC device models accepted in `NicSpec.model` (QEMU device driver names).
NIC_MODELS: Final = frozenset({"e1000", "e1000e", "virtio-net-pci", "rtl8139"})
#: The NIC model used when `NicSpec.model` is None, per generation.
DEFAULT_NIC_MODEL: Final = {1: "e1000", 2: "virtio-net-pci"}
#: NIC backends (``-netdev`` types) supported so far.
NIC_BACKENDS: Final = frozenset({"user", "tap"})
#: A TAP's interface name: at most 15 bytes (IFNAMSIZ), nothing QEMU's option syntax or a
#: shell would treat specially.
_TAP_IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

MIN_MEMORY_MIB: Final = 16
#: i440fx allows 255 CPUs, q35 288; one limit for both keeps things simple.
MAX_VCPUS: Final = 255
#: The PIIX3 IDE controller has two buses with two units each, shared by disks and CD-ROMs.
MAX_IDE_DEVICES_GEN1: Final = 4
#: The ICH9 AHCI controller has six ports (``ide.0`` to ``ide.5``), one unit each.
MAX_CDROMS_GEN2: Final = 6
#: Each gen 2 disk and NIC takes a root port; these bounds keep the number of root ports
#: (and the I/O and memory windows OVMF reserves for them) modest.
MAX_DISKS_GEN2: Final = 8
MAX_NICS: Final = 4
#: Empty pcie-root-ports created on gen 2 for hot-plugging disks/NICs later (as libvirt does).
SPARE_ROOT_PORTS: Final = 8

#: Linux's sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH: Final = 107

#: Machine types per generation: the bus names used below (pci.0/ide.N, pcie.0/AHCI ide.N)
#: depend on the chipset.
_MACHINE_RE: Final = {
    1: re.compile(r"pc(-i440fx-[0-9]+\.[0-9]+)?"),
    2: re.compile(r"(q35|pc-q35-[0-9]+\.[0-9]+)"),
}

# CPU model: with KVM, "host" passes the host CPU through (best performance; live
# migration then needs identical hosts). With TCG, "max" enables every feature TCG
# emulates, so modern guests needing x86-64-v2/v3 boot (qemu64 lacks SSE4.2/POPCNT,
# which e.g. RHEL 9 requires); it is migratable between identical QEMU versions.
# Migrating across hosts or QEMU versions will need a named model (e.g. "Skylake-Server")
# chosen by the caller: that would be a new `VmSpec` field, not a change here.
_CPU_MODEL: Final = {Accel.KVM: "host", Accel.TCG: "max"}

# seccomp sandbox: besides obsolete syscalls, QEMU may not change uid/gid (so no -runas:
# drop privileges before exec), fork/exec anything (so no tap helper scripts or "exec:"
# migration), or change CPU affinity/scheduling/memory policy of its threads.
_SANDBOX: Final = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# Writeback caching through the host page cache, with guest flushes honoured. Writable
# disks pass guest discards (TRIM) down to the image so it can shrink; detect-zeroes is
# left at its default (off), as libvirt does, since it costs CPU on every write.
_CACHE: Final = {"direct": False, "no-flush": False}


def quote_option_value(value: str) -> str:
    """Escape `value` for QEMU's ``key=value,...`` option syntax.

    A comma inside a value is written as two commas; nothing else is special once a
    value follows an explicit ``key=``. (A value for an option's *implied* first key,
    written without ``key=``, must also not contain ``=``: always spell the key out.)
    """
    return value.replace(",", ",,")


def _json_arg(obj: dict[str, Any]) -> str:
    """One compact JSON object, as accepted by ``-blockdev`` and ``-device``."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------
# validation


def _has_control_char(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _check_text(what: str, text: str) -> None:
    if _has_control_char(text):
        raise ValueError(f"{what} contains a control character (NUL, newline, ...): {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8: {text!r}") from None


def _check_path(what: str, path: object) -> str:
    """Validate a host path and return it as a string."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{what} must be a path, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a text path, got bytes")
    if not text:
        raise ValueError(f"{what} is empty")
    _check_text(what, text)
    if not text.startswith("/"):
        # QEMU would resolve it against its own working directory.
        raise ValueError(f"{what} must be an absolute path: {text!r}")
    return text


def _check_int(what: str, value: object, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{what} must be {bound}, got {value}")
    return value


def validate_spec(spec: VmSpec) -> None:
    """Raise `ValueError` if `spec` cannot be expressed as a QEMU command line."""
    if not isinstance(spec.name, str) or not NAME_RE.fullmatch(spec.name):
        raise ValueError(
            f"VM name {spec.name!r} is invalid: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    try:
        canonical = str(uuid.UUID(spec.uuid))
    except (ValueError, TypeError, AttributeError):
        canonical = None
    if canonical != spec.uuid:
        raise ValueError(
            f"VM uuid {spec.uuid!r} is not a canonical lower-case UUID "
            "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        )

    generation = spec.generation
    if generation not in (1, 2) or isinstance(generation, bool):
        raise ValueError(f"generation must be 1 or 2, got {generation!r}")
    _check_int("vcpus", spec.vcpus, 1, MAX_VCPUS)
    _check_int("memory_mib", spec.memory_mib, MIN_MEMORY_MIB)

    if not isinstance(spec.machine, str) or not _MACHINE_RE[generation].fullmatch(spec.machine):
        expected = "'pc' or 'pc-i440fx-X.Y'" if generation == 1 else "'q35' or 'pc-q35-X.Y'"
        raise ValueError(
            f"machine {spec.machine!r} does not fit generation {generation}: expected {expected}"
        )
    if spec.accel not in (Accel.KVM, Accel.TCG):
        raise ValueError(f"accel must be 'kvm' or 'tcg', got {spec.accel!r}")

    # Runtime files: unix sockets have a short path limit.
    _check_path("runtime.run_dir", spec.runtime.run_dir)
    _check_path("runtime.pidfile", spec.runtime.pidfile)
    for what, sock in (
        ("QMP socket", spec.runtime.qmp_socket),
        ("serial socket", spec.runtime.serial_socket),
        ("VNC socket", spec.runtime.vnc_socket),
        ("guest agent socket", spec.runtime.qga_socket),
    ):
        length = len(_check_path(what, sock).encode("utf-8"))
        if length > _MAX_UNIX_SOCKET_PATH:
            raise ValueError(
                f"{what} path {str(sock)!r} is {length} bytes long; unix socket paths are "
                f"limited to {_MAX_UNIX_SOCKET_PATH}: use a shorter runtime.run_dir"
            )

    # Firmware.
    if generation == 2:
        if spec.firmware is None:
            raise ValueError("generation 2 needs firmware (the OVMF code and vars files)")
    elif spec.firmware is not None:
        raise ValueError("firmware is only used by generation 2 (generation 1 uses SeaBIOS)")

    # Image files: a writable image must not be opened twice (QEMU's image locking
    # would refuse to start).
    images: list[tuple[str, bool]] = []  # (path, writable)
    if spec.firmware is not None:
        images.append((_check_path("firmware.code", spec.firmware.code), False))
        images.append((_check_path("firmware.vars", spec.firmware.vars), True))

    for i, disk in enumerate(spec.disks):
        path = _check_path(f"disk {i} path", disk.path)
        if disk.format not in DISK_FORMATS:
            raise ValueError(
                f"disk {i} format {disk.format!r} is not supported "
                f"(expected one of: {', '.join(sorted(DISK_FORMATS))})"
            )
        if not isinstance(disk.read_only, bool):
            raise ValueError(f"disk {i} read_only must be a bool, got {disk.read_only!r}")
        if disk.read_only and generation == 1:
            raise ValueError(
                f"disk {i} is read-only, but generation 1 attaches disks as IDE hard disks, "
                "which QEMU cannot make read-only; use generation 2 (virtio-blk)"
            )
        images.append((path, not disk.read_only))

    for i, cdrom in enumerate(spec.cdroms):
        if cdrom.iso is not None:
            images.append((_check_path(f"cdrom {i} iso", cdrom.iso), False))

    counts = Counter(path for path, _ in images)
    for path, writable in images:
        if writable and counts[path] > 1:
            raise ValueError(f"image {path!r} is writable and is attached more than once")

    # Controller capacity.
    if generation == 1:
        used = len(spec.disks) + len(spec.cdroms)
        if used > MAX_IDE_DEVICES_GEN1:
            raise ValueError(
                f"generation 1 has {MAX_IDE_DEVICES_GEN1} IDE slots for disks and CD-ROMs "
                f"together; the spec has {len(spec.disks)} disks and {len(spec.cdroms)} CD-ROMs"
            )
    else:
        if len(spec.disks) > MAX_DISKS_GEN2:
            raise ValueError(
                f"generation 2 supports at most {MAX_DISKS_GEN2} disks, got {len(spec.disks)}"
            )
        if len(spec.cdroms) > MAX_CDROMS_GEN2:
            raise ValueError(
                f"generation 2 has {MAX_CDROMS_GEN2} AHCI ports for CD-ROMs, "
                f"got {len(spec.cdroms)} CD-ROMs"
            )

    # NICs.
    if len(spec.nics) > MAX_NICS:
        raise ValueError(f"at most {MAX_NICS} NICs are supported, got {len(spec.nics)}")
    seen_macs: set[str] = set()
    for i, nic in enumerate(spec.nics):
        if not isinstance(nic.mac, str) or not MAC_RE.fullmatch(nic.mac):
            raise ValueError(
                f"NIC {i} MAC {nic.mac!r} is invalid: expected lower-case 52:54:00:xx:xx:xx"
            )
        if not nic.mac.startswith("52:54:00:"):
            raise ValueError(
                f"NIC {i} MAC {nic.mac!r} is outside QEMU's range: expected 52:54:00:xx:xx:xx"
            )
        if nic.mac in seen_macs:
            raise ValueError(f"NIC {i} MAC {nic.mac} is used by another NIC")
        seen_macs.add(nic.mac)
        if nic.model is not None and nic.model not in NIC_MODELS:
            raise ValueError(
                f"NIC {i} model {nic.model!r} is unknown "
                f"(expected one of: {', '.join(sorted(NIC_MODELS))})"
            )
        if nic.backend not in NIC_BACKENDS:
            raise ValueError(
                f"NIC {i} backend {nic.backend!r} is not supported "
                f"(expected one of: {', '.join(sorted(NIC_BACKENDS))})"
            )
        if nic.backend == "tap":
            if (
                not isinstance(nic.tap, str)
                or not _TAP_IFNAME_RE.fullmatch(nic.tap)
                or nic.tap in (".", "..")
            ):
                raise ValueError(
                    f"NIC {i} TAP name {nic.tap!r} is invalid: use 1-15 letters, digits, "
                    "'_', '.' or '-'"
                )
        elif nic.tap is not None:
            raise ValueError(f"NIC {i} names TAP {nic.tap!r} but its backend is {nic.backend!r}")

    # Boot order.
    seen_boot: set[BootDevice] = set()
    for entry in spec.boot_order:
        if entry not in (BootDevice.DISK, BootDevice.CDROM, BootDevice.NETWORK):
            raise ValueError(f"boot_order entry {entry!r} is not one of disk, cdrom, network")
        if entry in seen_boot:
            raise ValueError(f"boot_order lists {str(entry)!r} more than once")
        seen_boot.add(BootDevice(entry))

    # Direct kernel boot.
    kb = spec.kernel_boot
    if kb is not None:
        _check_path("kernel_boot.kernel", kb.kernel)
        if kb.initrd is not None:
            initrd = _check_path("kernel_boot.initrd", kb.initrd)
            if "," in initrd:
                # QEMU splits -initrd on commas for multiboot kernels (and ",," is not
                # unescaped for Linux kernels), so no spelling works for both: reject.
                raise ValueError(f"kernel_boot.initrd must not contain a comma: {initrd!r}")
        if not isinstance(kb.cmdline, str):
            raise ValueError(f"kernel_boot.cmdline must be a string, got {kb.cmdline!r}")
        _check_text("kernel_boot.cmdline", kb.cmdline)


# ---------------------------------------------------------------------------
# PCI layout


@dataclass(frozen=True)
class PcieRootPort:
    """One ``pcie-root-port`` of a generation 2 VM.

    `device_id` is the id of the device plugged into it at start (a NIC or a disk), or
    None for a spare port kept free for hot-plug (``device_add ... bus=<id>``).
    """

    id: str
    addr: str  # on pcie.0, "0xS" for function 0 or "0xS.0xF"
    chassis: int
    port: int
    device_id: str | None


_ROOT_PORT_FIRST_SLOT: Final = 0x2  # 0x0 is the host bridge, 0x1 the video device


def pcie_root_ports(spec: VmSpec) -> tuple[PcieRootPort, ...]:
    """The root ports of a generation 2 VM (empty for generation 1).

    NICs come first, then disks, then `SPARE_ROOT_PORTS` spare ports. The firmware
    numbers PCI buses in root port order, so putting NICs first keeps their bus
    numbers, hence predictable interface names like ``enp1s0``, stable when disks are
    added. Root ports are packed as the eight functions of consecutive slots starting
    at pcie.0 slot 2 (function 0 multifunction), as libvirt does, which saves slots.
    """
    if spec.generation != 2:
        return ()
    occupants: list[str | None] = [f"net{i}" for i in range(len(spec.nics))]
    occupants += [f"disk{i}" for i in range(len(spec.disks))]
    occupants += [None] * SPARE_ROOT_PORTS
    ports = []
    for k, device_id in enumerate(occupants):
        slot, function = _ROOT_PORT_FIRST_SLOT + k // 8, k % 8
        addr = f"{slot:#x}" if function == 0 else f"{slot:#x}.{function:#x}"
        ports.append(
            PcieRootPort(id=f"rp{k}", addr=addr, chassis=k + 1, port=0x10 + k, device_id=device_id)
        )
    return tuple(ports)


def _root_port_device(rp: PcieRootPort) -> dict[str, Any]:
    dev: dict[str, Any] = {"driver": "pcie-root-port", "id": rp.id, "bus": "pcie.0"}
    dev["addr"] = rp.addr
    if "." not in rp.addr:
        dev["multifunction"] = True
    dev["chassis"] = rp.chassis
    dev["port"] = rp.port
    return dev


# ---------------------------------------------------------------------------
# argv


def _boot_indexes(spec: VmSpec) -> dict[str, int]:
    """Map device id -> bootindex, following `spec.boot_order` (1, 2, ... compactly)."""
    if spec.kernel_boot is not None:
        return {}  # the kernel is loaded directly; device boot order does not apply
    first = {
        BootDevice.DISK: "disk0" if spec.disks else None,
        BootDevice.CDROM: "cdrom0" if spec.cdroms else None,
        BootDevice.NETWORK: "net0" if spec.nics else None,
    }
    indexes: dict[str, int] = {}
    for entry in spec.boot_order:
        device_id = first[BootDevice(entry)]
        if device_id is not None:
            indexes[device_id] = len(indexes) + 1
    return indexes


def blockdev_nodes(
    name: str, path: str, fmt: str, *, read_only: bool, with_cache: bool = True
) -> list[dict[str, Any]]:
    """A protocol node ``<name>-file`` and a format node ``<name>`` over it.

    The same dictionaries serve ``-blockdev`` at start and QMP ``blockdev-add``
    at hot-plug, so a hot-plugged disk is opened exactly like a cold one.
    """
    file_node: dict[str, Any] = {"driver": "file", "node-name": f"{name}-file", "filename": path}
    fmt_node: dict[str, Any] = {"driver": fmt, "node-name": name, "file": f"{name}-file"}
    for node in (file_node, fmt_node):
        if read_only:
            node["read-only"] = True
        if with_cache:
            node["cache"] = dict(_CACHE)
        if not read_only and with_cache:
            node["discard"] = "unmap"
    return [file_node, fmt_node]


def _blockdev_pair(
    name: str, path: str, fmt: str, *, read_only: bool, with_cache: bool = True
) -> list[str]:
    """``-blockdev`` arguments for a protocol node ``<name>-file`` and format node ``<name>``."""
    argv: list[str] = []
    for node in blockdev_nodes(name, path, fmt, read_only=read_only, with_cache=with_cache):
        argv += ["-blockdev", _json_arg(node)]
    return argv


def build_argv(spec: VmSpec, *, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    """Return the full argv (binary first) that runs `spec` under QEMU 7.2.

    Raises `ValueError` (from `validate_spec`) if the spec cannot be expressed.
    The argv neither daemonizes nor logs to a file: the supervisor detaches the
    process and redirects its stderr.
    """
    validate_spec(spec)
    gen = spec.generation
    accel = Accel(spec.accel)
    run = spec.runtime
    boot = _boot_indexes(spec)

    argv: list[str] = [qemu_binary]

    # Identity.
    argv += ["-name", f"guest={quote_option_value(spec.name)},debug-threads=on"]
    argv += ["-uuid", spec.uuid]

    # Machine, CPU, memory.
    machine = f"{spec.machine},accel={accel.value}"
    if spec.firmware is not None:
        machine += ",pflash0=fw-code,pflash1=fw-vars"
    argv += ["-machine", machine]
    argv += ["-cpu", _CPU_MODEL[accel]]
    argv += ["-smp", f"{spec.vcpus},sockets=1,cores={spec.vcpus},threads=1"]
    argv += ["-m", f"size={spec.memory_mib}M"]

    # Firmware (gen 2): OVMF code read-only, the VM's own vars writable, on pflash.
    if spec.firmware is not None:
        argv += _blockdev_pair(
            "fw-code", os.fspath(spec.firmware.code), "raw", read_only=True, with_cache=False
        )
        argv += _blockdev_pair(
            "fw-vars", os.fspath(spec.firmware.vars), "raw", read_only=False, with_cache=False
        )

    # Process: no default devices, no config files, seccomp sandbox, pidfile.
    argv += ["-nodefaults", "-no-user-config"]
    argv += ["-msg", "timestamp=on"]
    argv += ["-sandbox", _SANDBOX]
    argv += ["-pidfile", os.fspath(run.pidfile)]

    # QMP monitor and serial console on unix sockets (QEMU listens, never waits).
    qmp = quote_option_value(os.fspath(run.qmp_socket))
    argv += ["-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off"]
    argv += ["-mon", "chardev=qmp,mode=control"]
    serial = quote_option_value(os.fspath(run.serial_socket))
    argv += ["-chardev", f"socket,id=serial0,path={serial},server=on,wait=off"]
    argv += ["-device", _json_arg({"driver": "isa-serial", "id": "serial0", "chardev": "serial0"})]

    # Guest agent: a virtio-serial port that a qemu-guest-agent in the guest opens
    # (QEMU reports it with VSERPORT_CHANGE); the controller sits at a slot no
    # other device takes (pci.0 slot 0x1e on gen 1, pcie.0 slot 0x1e on gen 2).
    qga = quote_option_value(os.fspath(run.qga_socket))
    argv += ["-chardev", f"socket,id=qga0,path={qga},server=on,wait=off"]
    vserial = {
        "driver": "virtio-serial-pci",
        "id": "vserial0",
        "bus": "pci.0" if spec.generation == 1 else "pcie.0",
        "addr": "0x1e",
    }
    argv += ["-device", _json_arg(vserial)]
    port = {
        "driver": "virtserialport",
        "id": "qga0",
        "chardev": "qga0",
        "name": "org.qemu.guest_agent.0",
        "bus": "vserial0.0",
    }
    argv += ["-device", _json_arg(port)]

    # Display: no local window; a video card and a VNC server on a unix socket. The key
    # "vnc=" is spelled out because an implied first value may not contain "=".
    argv += ["-display", "none"]
    argv += ["-vnc", f"vnc=unix:{quote_option_value(os.fspath(run.vnc_socket))}"]
    if gen == 1:
        video = {"driver": "VGA", "id": "video0", "bus": "pci.0", "addr": "0x2"}
    else:
        video = {"driver": "virtio-vga", "id": "video0", "bus": "pcie.0", "addr": "0x1"}
    argv += ["-device", _json_arg(video)]

    # PCIe topology (gen 2): one root port per NIC/disk plus spares for hot-plug
    # (devices on pcie.0 itself cannot be hot-unplugged on q35).
    root_ports = pcie_root_ports(spec)
    port_of = {rp.device_id: rp.id for rp in root_ports if rp.device_id is not None}
    for rp in root_ports:
        argv += ["-device", _json_arg(_root_port_device(rp))]

    # Disks. Gen 1: IDE slots ide.0 unit 0, ide.0 unit 1, ide.1 unit 0, ide.1 unit 1,
    # used by the disks first, then the CD-ROMs. Gen 2: virtio-blk behind root ports.
    ide_slots = [(f"ide.{bus}", unit) for bus in (0, 1) for unit in (0, 1)]
    for i, disk in enumerate(spec.disks):
        dev_id = f"disk{i}"
        argv += _blockdev_pair(dev_id, os.fspath(disk.path), disk.format, read_only=disk.read_only)
        dev: dict[str, Any]
        if gen == 1:
            bus, unit = ide_slots.pop(0)
            dev = {"driver": "ide-hd", "id": dev_id, "bus": bus, "unit": unit, "drive": dev_id}
        else:
            dev = {"driver": "virtio-blk-pci", "id": dev_id, "bus": port_of[dev_id]}
            dev["addr"] = "0x0"
            dev["drive"] = dev_id
        if dev_id in boot:
            dev["bootindex"] = boot[dev_id]
        argv += ["-device", _json_arg(dev)]

    # CD-ROMs: ide-cd on the IDE (gen 1) or AHCI (gen 2, ports ide.0-ide.5) bus. An
    # empty drive has no blockdev; media can be inserted later via QMP using the id.
    for i, cdrom in enumerate(spec.cdroms):
        dev_id = f"cdrom{i}"
        if gen == 1:
            bus, unit = ide_slots.pop(0)
            dev = {"driver": "ide-cd", "id": dev_id, "bus": bus, "unit": unit}
        else:
            dev = {"driver": "ide-cd", "id": dev_id, "bus": f"ide.{i}"}
        if cdrom.iso is not None:
            argv += _blockdev_pair(dev_id, os.fspath(cdrom.iso), "raw", read_only=True)
            dev["drive"] = dev_id
        if dev_id in boot:
            dev["bootindex"] = boot[dev_id]
        argv += ["-device", _json_arg(dev)]

    # NICs: gen 1 at fixed pci.0 slots from 3, gen 2 behind root ports. A TAP backend opens
    # an existing TAP by name and runs no helper scripts (the sandbox denies spawning them).
    for i, nic in enumerate(spec.nics):
        dev_id = f"net{i}"
        if nic.backend == "tap":
            assert nic.tap is not None
            ifname = quote_option_value(nic.tap)
            argv += ["-netdev", f"tap,id={dev_id},ifname={ifname},script=no,downscript=no"]
        else:
            argv += ["-netdev", f"{nic.backend},id={dev_id}"]
        model = nic.model or DEFAULT_NIC_MODEL[gen]
        if gen == 1:
            dev = {"driver": model, "id": dev_id, "bus": "pci.0", "addr": f"{3 + i:#x}"}
        else:
            dev = {"driver": model, "id": dev_id, "bus": port_of[dev_id], "addr": "0x0"}
        dev["netdev"] = dev_id
        dev["mac"] = nic.mac
        if dev_id in boot:
            dev["bootindex"] = boot[dev_id]
        argv += ["-device", _json_arg(dev)]

    # Direct kernel boot. -kernel, -initrd and -append take their argument verbatim
    # (no option parsing); commas in the initrd path are rejected by validate_spec.
    kb = spec.kernel_boot
    if kb is not None:
        argv += ["-kernel", os.fspath(kb.kernel)]
        if kb.initrd is not None:
            argv += ["-initrd", os.fspath(kb.initrd)]
        if kb.cmdline:
            argv += ["-append", kb.cmdline]

    return argv
