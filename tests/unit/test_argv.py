"""Golden and validation tests of `vmhive.hypervisor.qemu.argv`.

Each ``tests/golden/<case>.json`` is a `VmSpec` as JSON and ``<case>.argv`` the exact
argv `build_argv` must produce, one argument per line. To accept a deliberate change,
run ``VMHIVE_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_argv.py``: the .argv
files are rewritten and every changed file is reported as a warning; review the diff.

`test_argv_accepted_by_qemu` starts the real qemu-system-x86_64 with each golden argv
(paths moved to a temporary directory holding real images) and checks, over QMP, that
it started, created the devices under their ids, and runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmhive.hypervisor.qemu.argv import (
    SPARE_ROOT_PORTS,
    build_argv,
    pcie_root_ports,
    quote_option_value,
    validate_spec,
)
from vmhive.hypervisor.spec import (
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

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
REGENERATE = os.environ.get("VMHIVE_REGENERATE_GOLDEN") == "1"
CASES = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))


# ---------------------------------------------------------------------------
# spec loader


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def spec_from_json(data: dict[str, Any]) -> VmSpec:
    """Build a VmSpec from the JSON form used by the golden files.

    Keys mirror the dataclass fields; optional ones may be left out to get the
    dataclass default. ``runtime`` is ``{"run_dir": ...}``.
    """
    kwargs: dict[str, Any] = {
        "name": data["name"],
        "uuid": data["uuid"],
        "generation": data["generation"],
        "vcpus": data["vcpus"],
        "memory_mib": data["memory_mib"],
        "machine": data["machine"],
        "accel": Accel(data["accel"]),
        "runtime": RuntimePaths(run_dir=Path(data["runtime"]["run_dir"])),
    }
    if "disks" in data:
        kwargs["disks"] = tuple(
            DiskSpec(path=Path(d["path"]), **{k: v for k, v in d.items() if k != "path"})
            for d in data["disks"]
        )
    if "cdroms" in data:
        kwargs["cdroms"] = tuple(CdromSpec(iso=_opt_path(c.get("iso"))) for c in data["cdroms"])
    if "nics" in data:
        kwargs["nics"] = tuple(NicSpec(**n) for n in data["nics"])
    if "boot_order" in data:
        kwargs["boot_order"] = tuple(BootDevice(b) for b in data["boot_order"])
    if data.get("kernel_boot") is not None:
        kb = data["kernel_boot"]
        kwargs["kernel_boot"] = KernelBoot(
            kernel=Path(kb["kernel"]),
            initrd=_opt_path(kb.get("initrd")),
            cmdline=kb.get("cmdline", ""),
        )
    if data.get("firmware") is not None:
        fw = data["firmware"]
        kwargs["firmware"] = Firmware(code=Path(fw["code"]), vars=Path(fw["vars"]))
    unknown = set(data) - {f.name for f in dataclasses.fields(VmSpec)}
    assert not unknown, f"unknown keys in golden spec: {sorted(unknown)}"
    return VmSpec(**kwargs)


def load_case(case: str) -> VmSpec:
    return spec_from_json(json.loads((GOLDEN_DIR / f"{case}.json").read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------
# golden tests


def test_golden_cases_exist() -> None:
    assert len(CASES) >= 9
    orphans = {p.stem for p in GOLDEN_DIR.glob("*.argv")} - set(CASES)
    assert not orphans, f".argv files without a .json spec: {sorted(orphans)}"


@pytest.mark.parametrize("case", CASES)
def test_golden_argv(case: str) -> None:
    argv = build_argv(load_case(case))
    assert all("\n" not in arg and "\r" not in arg for arg in argv)
    text = "".join(f"{arg}\n" for arg in argv)
    golden = GOLDEN_DIR / f"{case}.argv"
    old = golden.read_text(encoding="utf-8") if golden.exists() else None
    if REGENERATE:
        if old != text:
            golden.write_text(text, encoding="utf-8")
            warnings.warn(f"golden file rewritten: {golden}", stacklevel=1)
        return
    assert old is not None, (
        f"{golden} is missing: run VMHIVE_REGENERATE_GOLDEN=1 pytest tests/unit/test_argv.py"
    )
    assert text.splitlines() == old.splitlines(), (
        f"argv differs from {golden}; if intended, regenerate with VMHIVE_REGENERATE_GOLDEN=1"
    )
    assert text == old


def _json_args(argv: list[str], option: str) -> list[dict[str, Any]]:
    out = []
    for flag, value in itertools.pairwise(argv):
        if flag == option and value.startswith("{"):
            out.append(json.loads(value))
    return out


@pytest.mark.parametrize("case", CASES)
def test_argv_invariants(case: str) -> None:
    """Structural properties every argv must have, independent of the golden text."""
    spec = load_case(case)
    argv = build_argv(spec, qemu_binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for forbidden in ("-daemonize", "-D", "-drive", "-hda", "-cdrom", "-boot"):
        assert forbidden not in argv
    for required in ("-nodefaults", "-no-user-config", "-sandbox", "-pidfile", "-uuid"):
        assert required in argv

    devices = _json_args(argv, "-device")
    blockdevs = _json_args(argv, "-blockdev")
    assert len(devices) == argv.count("-device")
    assert len(blockdevs) == argv.count("-blockdev")
    ids = [d["id"] for d in devices]
    assert len(ids) == len(set(ids)), ids
    nodes = [b["node-name"] for b in blockdevs]
    assert len(nodes) == len(set(nodes)), nodes

    expected_ids = {"video0", "serial0", "qga0"}
    expected_ids |= {f"disk{i}" for i in range(len(spec.disks))}
    expected_ids |= {f"cdrom{i}" for i in range(len(spec.cdroms))}
    expected_ids |= {f"net{i}" for i in range(len(spec.nics))}
    assert expected_ids <= set(ids)

    # Every referenced bus is created before use (or built into the machine).
    builtin = {"pci.0", "ide.0", "ide.1"} if spec.generation == 1 else {"pcie.0"}
    builtin |= {f"ide.{i}" for i in range(6)} if spec.generation == 2 else set()
    created: set[str] = set()
    for dev in devices:
        if "bus" in dev:
            assert dev["bus"] in builtin | created, dev
        created.add(dev["id"])
        if dev["driver"] == "virtio-serial-pci":
            created.add(f"{dev['id']}.0")  # the serial bus it brings
    # Every drive refers to a format node.
    for dev in devices:
        if "drive" in dev:
            assert dev["drive"] in nodes

    bootindexes = [d["bootindex"] for d in devices if "bootindex" in d]
    if spec.kernel_boot is not None:
        assert bootindexes == []
    assert sorted(bootindexes) == list(range(1, len(bootindexes) + 1))

    if spec.generation == 2:
        ports = [d for d in devices if d["driver"] == "pcie-root-port"]
        assert len(ports) == len(spec.disks) + len(spec.nics) + SPARE_ROOT_PORTS
        assert "pflash0=fw-code,pflash1=fw-vars" in argv[argv.index("-machine") + 1]
    else:
        assert "pcie-root-port" not in {d["driver"] for d in devices}
        assert "pflash0" not in argv[argv.index("-machine") + 1]


def test_boot_order_follows_spec() -> None:
    spec = load_case("gen2_full")
    devices = {d["id"]: d for d in _json_args(build_argv(spec), "-device")}
    assert devices["cdrom0"]["bootindex"] == 1
    assert devices["disk0"]["bootindex"] == 2
    assert devices["net0"]["bootindex"] == 3
    assert "bootindex" not in devices["disk1"]
    assert "bootindex" not in devices["net1"]

    # Boot indexes stay compact when a device class is missing.
    spec = dataclasses.replace(spec, cdroms=())
    devices = {d["id"]: d for d in _json_args(build_argv(spec), "-device")}
    assert devices["disk0"]["bootindex"] == 1
    assert devices["net0"]["bootindex"] == 2

    spec = dataclasses.replace(spec, boot_order=())
    assert all("bootindex" not in d for d in _json_args(build_argv(spec), "-device"))


def test_root_port_layout_keeps_nics_first() -> None:
    spec = load_case("gen2_max_devices")
    ports = pcie_root_ports(spec)
    assert [p.device_id for p in ports[:4]] == ["net0", "net1", "net2", "net3"]
    assert [p.device_id for p in ports[4:12]] == [f"disk{i}" for i in range(8)]
    assert all(p.device_id is None for p in ports[12:])
    assert [p.addr for p in ports[:9]] == [
        "0x2",
        "0x2.0x1",
        "0x2.0x2",
        "0x2.0x3",
        "0x2.0x4",
        "0x2.0x5",
        "0x2.0x6",
        "0x2.0x7",
        "0x3",
    ]
    assert len({(p.chassis, p.port) for p in ports}) == len(ports)
    assert pcie_root_ports(load_case("gen1_minimal")) == ()


def test_quote_option_value() -> None:
    assert quote_option_value("/plain/path") == "/plain/path"
    assert quote_option_value("/a,b/c,,d") == "/a,,b/c,,,,d"
    assert quote_option_value("a=b c'\"") == "a=b c'\""
    assert quote_option_value("") == ""


def test_sockets_are_escaped() -> None:
    argv = build_argv(load_case("path_with_commas"))
    assert "socket,id=qmp,path=/run/vmhive/vms,,x/a=b c,,d/qmp.sock,server=on,wait=off" in argv
    assert "vnc=unix:/run/vmhive/vms,,x/a=b c,,d/vnc.sock" in argv
    assert "/run/vmhive/vms,x/a=b c,d/qemu.pid" in argv  # -pidfile is verbatim


def test_tap_nic_opens_the_named_tap_without_scripts() -> None:
    argv = build_argv(load_case("gen2_tap_nics"))
    netdevs = [value for flag, value in itertools.pairwise(argv) if flag == "-netdev"]
    assert netdevs == [
        "tap,id=net0,ifname=vh-t52a9d76709f,script=no,downscript=no",
        "tap,id=net1,ifname=vh-t0f1e2d3c4b5,script=no,downscript=no",
        "user,id=net2",
    ]


def test_kernel_cmdline_is_one_argument() -> None:
    spec = load_case("gen1_kernel_boot")
    assert spec.kernel_boot is not None
    argv = build_argv(spec)
    assert argv[argv.index("-append") + 1] == spec.kernel_boot.cmdline


# ---------------------------------------------------------------------------
# validate_spec


def _base() -> VmSpec:
    return load_case("gen2_full")


def _gen1() -> VmSpec:
    return load_case("gen1_empty_cdrom")


def _nic(mac: str, **kw: Any) -> tuple[NicSpec, ...]:
    return (NicSpec(mac=mac, **kw),)


INVALID: list[tuple[str, VmSpec, str]] = [
    ("name-upper", dataclasses.replace(_base(), name="Web1"), "VM name"),
    ("name-empty", dataclasses.replace(_base(), name=""), "VM name"),
    ("name-newline", dataclasses.replace(_base(), name="web1\n"), "VM name"),
    ("name-comma", dataclasses.replace(_base(), name="a,b"), "VM name"),
    ("uuid-bad", dataclasses.replace(_base(), uuid="not-a-uuid"), "uuid"),
    (
        "uuid-upper",
        dataclasses.replace(_base(), uuid="6F1C2A3E-0B7D-4C5E-9A1F-000000000003"),
        "uuid",
    ),
    ("generation-3", dataclasses.replace(_base(), generation=3), "generation must be 1 or 2"),
    ("generation-0", dataclasses.replace(_base(), generation=0), "generation must be 1 or 2"),
    ("vcpus-0", dataclasses.replace(_base(), vcpus=0), "vcpus"),
    ("vcpus-huge", dataclasses.replace(_base(), vcpus=1000), "vcpus"),
    ("memory-small", dataclasses.replace(_base(), memory_mib=15), "memory_mib"),
    ("gen2-no-firmware", dataclasses.replace(_base(), firmware=None), "needs firmware"),
    (
        "gen1-with-firmware",
        dataclasses.replace(_gen1(), firmware=Firmware(Path("/c.fd"), Path("/v.fd"))),
        "only used by generation 2",
    ),
    ("gen2-i440fx", dataclasses.replace(_base(), machine="pc-i440fx-7.2"), "machine"),
    ("gen1-q35", dataclasses.replace(_gen1(), machine="pc-q35-7.2"), "machine"),
    ("machine-comma", dataclasses.replace(_base(), machine="q35,smm=off"), "machine"),
    ("accel-bad", dataclasses.replace(_base(), accel="hvf"), "accel"),  # type: ignore[arg-type]
    (
        "mac-upper",
        dataclasses.replace(_base(), nics=_nic("52:54:00:AA:BB:CC")),
        "MAC",
    ),
    ("mac-prefix", dataclasses.replace(_base(), nics=_nic("02:00:00:aa:bb:cc")), "MAC"),
    ("mac-short", dataclasses.replace(_base(), nics=_nic("52:54:00:aa:bb")), "MAC"),
    (
        "mac-duplicate",
        dataclasses.replace(
            _base(), nics=(NicSpec(mac="52:54:00:00:00:01"), NicSpec(mac="52:54:00:00:00:01"))
        ),
        "used by another NIC",
    ),
    (
        "nic-model",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", model="ne2k_pci,x=y")),
        "model",
    ),
    (
        "nic-backend",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", backend="vde")),
        "backend",
    ),
    (
        "tap-without-name",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", backend="tap")),
        "TAP name",
    ),
    (
        "tap-name-comma",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", backend="tap", tap="t,x=y")),
        "TAP name",
    ),
    (
        "tap-name-too-long",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", backend="tap", tap="t" * 16)),
        "TAP name",
    ),
    (
        "tap-name-on-user",
        dataclasses.replace(_base(), nics=_nic("52:54:00:00:00:01", tap="vh-t1")),
        "but its backend",
    ),
    (
        "too-many-nics",
        dataclasses.replace(
            _base(), nics=tuple(NicSpec(mac=f"52:54:00:00:00:0{i}") for i in range(5))
        ),
        "NICs",
    ),
    (
        "disk-path-nul",
        dataclasses.replace(_base(), disks=(DiskSpec(path=Path("/a\0b.qcow2")),)),
        "control character",
    ),
    (
        "disk-path-newline",
        dataclasses.replace(_base(), disks=(DiskSpec(path=Path("/a\nb.qcow2")),)),
        "control character",
    ),
    (
        "disk-path-relative",
        dataclasses.replace(_base(), disks=(DiskSpec(path=Path("disk.qcow2")),)),
        "absolute",
    ),
    (
        "disk-path-not-utf8",
        dataclasses.replace(_base(), disks=(DiskSpec(path=Path("/a\udcff.qcow2")),)),
        "UTF-8",
    ),
    (
        "disk-format",
        dataclasses.replace(_base(), disks=(DiskSpec(path=Path("/a.vmdk"), format="vmdk"),)),
        "format",
    ),
    (
        "disk-twice",
        dataclasses.replace(
            _base(), disks=(DiskSpec(Path("/a.qcow2")), DiskSpec(Path("/a.qcow2")))
        ),
        "more than once",
    ),
    (
        "gen1-read-only",
        dataclasses.replace(_gen1(), disks=(DiskSpec(Path("/a.qcow2"), read_only=True),)),
        "read-only",
    ),
    (
        "gen1-too-many-ide",
        dataclasses.replace(
            _gen1(),
            disks=tuple(DiskSpec(Path(f"/d{i}.qcow2")) for i in range(4)),
            cdroms=(CdromSpec(),),
        ),
        "IDE slots",
    ),
    (
        "gen2-too-many-cdroms",
        dataclasses.replace(_base(), cdroms=tuple(CdromSpec() for _ in range(7))),
        "AHCI",
    ),
    (
        "gen2-too-many-disks",
        dataclasses.replace(_base(), disks=tuple(DiskSpec(Path(f"/d{i}.qcow2")) for i in range(9))),
        "disks",
    ),
    (
        "iso-newline",
        dataclasses.replace(_base(), cdroms=(CdromSpec(iso=Path("/x\n.iso")),)),
        "control character",
    ),
    (
        "run-dir-newline",
        dataclasses.replace(_base(), runtime=RuntimePaths(Path("/run/x\ny"))),
        "control character",
    ),
    (
        "run-dir-too-long",
        dataclasses.replace(_base(), runtime=RuntimePaths(Path("/run/" + "x" * 100))),
        "unix socket",
    ),
    (
        "boot-order-duplicate",
        dataclasses.replace(_base(), boot_order=(BootDevice.DISK, BootDevice.DISK)),
        "more than once",
    ),
    (
        "boot-order-unknown",
        dataclasses.replace(_base(), boot_order=("floppy",)),  # type: ignore[arg-type]
        "boot_order",
    ),
    (
        "initrd-comma",
        dataclasses.replace(
            _base(), kernel_boot=KernelBoot(Path("/k"), initrd=Path("/i,nitrd"), cmdline="")
        ),
        "comma",
    ),
    (
        "cmdline-newline",
        dataclasses.replace(_base(), kernel_boot=KernelBoot(Path("/k"), cmdline="a\nb")),
        "control character",
    ),
    (
        "kernel-relative",
        dataclasses.replace(_base(), kernel_boot=KernelBoot(Path("vmlinuz"))),
        "absolute",
    ),
    (
        "firmware-vars-nul",
        dataclasses.replace(_base(), firmware=Firmware(Path("/c.fd"), Path("/v\0.fd"))),
        "control character",
    ),
]


@pytest.mark.parametrize(
    ("spec", "message"), [(s, m) for _, s, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_validate_spec_rejects(spec: VmSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_spec(spec)
    with pytest.raises(ValueError, match=message):
        build_argv(spec)


@pytest.mark.parametrize("case", CASES)
def test_validate_spec_accepts_golden(case: str) -> None:
    validate_spec(load_case(case))


def test_validate_accepts_string_enums() -> None:
    spec = dataclasses.replace(_base(), accel="tcg", boot_order=("disk",))  # type: ignore[arg-type]
    assert build_argv(spec) == build_argv(
        dataclasses.replace(_base(), accel=Accel.TCG, boot_order=(BootDevice.DISK,))
    )


# ---------------------------------------------------------------------------
# real QEMU

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
STARTUP_DEADLINE = 10.0


def _fake_bzimage(path: Path) -> None:
    """A file with a valid Linux/x86 boot header: enough for QEMU to load it (never run)."""
    setup_sects = 4
    data = bytearray(512 * (setup_sects + 1) + 4096)
    data[0x1F1] = setup_sects
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)  # boot protocol 2.15
    data[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", data, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", data, 0x238, 2048)  # cmdline_size
    path.write_bytes(bytes(data))


def _make_image(path: Path, fmt: str) -> None:
    if fmt == "raw":
        with path.open("wb") as f:
            f.truncate(64 << 20)
        return
    assert QEMU_IMG is not None
    # Created under a plain name, then renamed: the name may hold commas etc.
    plain = path.parent / f"tmp-{os.getpid()}.{fmt}"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(plain), "64M"], check=True, timeout=30)
    plain.rename(path)


def _localize(spec: VmSpec, tmp: Path) -> VmSpec:
    """The same spec with every host file replaced by a real one under `tmp`."""
    run_dir = tmp / f"run-{spec.runtime.run_dir.name}"
    run_dir.mkdir()
    disks = []
    for i, disk in enumerate(spec.disks):
        path = tmp / f"disk{i}-{disk.path.name}"
        _make_image(path, disk.format)
        disks.append(dataclasses.replace(disk, path=path))
    cdroms = []
    for i, cdrom in enumerate(spec.cdroms):
        if cdrom.iso is None:
            cdroms.append(cdrom)
            continue
        iso = tmp / f"cd{i}-{cdrom.iso.name}"
        with iso.open("wb") as f:
            f.truncate(1 << 20)
        cdroms.append(CdromSpec(iso=iso))
    firmware = None
    if spec.firmware is not None:
        if not (OVMF_CODE.exists() and OVMF_VARS.exists()):
            pytest.skip(f"OVMF not installed ({OVMF_CODE}, {OVMF_VARS})")
        code = tmp / f"code-{spec.firmware.code.name}"
        code.symlink_to(OVMF_CODE)
        fw_vars = tmp / f"vars-{spec.firmware.vars.name}"
        shutil.copyfile(OVMF_VARS, fw_vars)
        firmware = Firmware(code=code, vars=fw_vars)
    kernel_boot = None
    if spec.kernel_boot is not None:
        kernel = tmp / f"kernel-{spec.kernel_boot.kernel.name}"
        _fake_bzimage(kernel)
        initrd = None
        if spec.kernel_boot.initrd is not None:
            initrd = tmp / f"initrd-{spec.kernel_boot.initrd.name}"
            initrd.write_bytes(b"\0" * 4096)
        kernel_boot = dataclasses.replace(spec.kernel_boot, kernel=kernel, initrd=initrd)
    # This workplace's /dev/kvm cannot run `-cpu host` guests (nested KVM rejects an MSR),
    # so KVM is used only on request.
    accel = spec.accel if os.environ.get("VMHIVE_TEST_KVM") == "1" else Accel.TCG
    return dataclasses.replace(
        spec,
        runtime=RuntimePaths(run_dir=run_dir),
        disks=tuple(disks),
        cdroms=tuple(cdroms),
        firmware=firmware,
        kernel_boot=kernel_boot,
        accel=accel,
    )


class _Qmp:
    """A minimal synchronous QMP client (enough for a smoke test)."""

    def __init__(self, path: Path, deadline: float) -> None:
        # QEMU binds the socket a moment before it listens: retry a refused connect.
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.sock.connect(str(path))
                break
            except ConnectionRefusedError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        assert "return" in reply, f"{command}: {reply}"
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def _short_tmpdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
    path = Path(tempfile.mkdtemp(prefix="vmh-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait_for_socket(proc: subprocess.Popen[bytes], path: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"QEMU exited with {proc.returncode} at startup:\n{err.decode()}")
        if path.is_socket():
            return
        time.sleep(0.02)
    pytest.fail(f"QEMU did not create {path} within {STARTUP_DEADLINE} s")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("case", CASES)
def test_argv_accepted_by_qemu(case: str) -> None:
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed")
    if any(nic.backend == "tap" for nic in load_case(case).nics):
        # QEMU would create the TAP in the host's network namespace; the network tests
        # boot a guest on a real TAP inside a namespace instead.
        pytest.skip("TAP NICs are started for real by tests/network/test_qemu_tap.py")
    assert QEMU is not None
    with _short_tmpdir() as tmp:
        spec = _localize(load_case(case), tmp)
        # -S: create everything, then wait for "cont" (nothing runs before we look).
        argv = [*build_argv(spec, qemu_binary=QEMU), "-S"]
        deadline = time.monotonic() + STARTUP_DEADLINE
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _wait_for_socket(proc, spec.runtime.qmp_socket, deadline)
            qmp = _Qmp(spec.runtime.qmp_socket, deadline)
            try:
                peripherals = {
                    p["name"] for p in qmp.execute("qom-list", path="/machine/peripheral")
                }
                expected = {"video0", "serial0"}
                expected |= {f"disk{i}" for i in range(len(spec.disks))}
                expected |= {f"cdrom{i}" for i in range(len(spec.cdroms))}
                expected |= {f"net{i}" for i in range(len(spec.nics))}
                expected |= {rp.id for rp in pcie_root_ports(spec)}
                assert expected <= peripherals, expected - peripherals

                # "qdev" is the device id, or a QOM path for virtio ("/machine/peripheral/
                # disk0/virtio-backend").
                blocks = {
                    b["qdev"].removeprefix("/machine/peripheral/").split("/")[0]: b
                    for b in qmp.execute("query-block")
                    if "qdev" in b
                }
                for i, cdrom in enumerate(spec.cdroms):
                    assert ("inserted" in blocks[f"cdrom{i}"]) == (cdrom.iso is not None)
                for i, disk in enumerate(spec.disks):
                    inserted = blocks[f"disk{i}"]["inserted"]
                    assert inserted["ro"] == disk.read_only
                    assert inserted["image"]["format"] == disk.format
                    assert inserted["file"] == str(disk.path)

                assert spec.runtime.pidfile.read_text().strip() == str(proc.pid)
                status = Path(f"/proc/{proc.pid}/status")
                if status.exists():  # -sandbox on: seccomp filter mode
                    assert "Seccomp:\t2" in status.read_text()
                assert spec.runtime.serial_socket.is_socket()
                assert spec.runtime.vnc_socket.is_socket()

                qmp.execute("cont")
                time.sleep(0.2)
                assert qmp.execute("query-status")["status"] == "running"
                qmp.execute("quit")
            finally:
                qmp.close()
            _, err = proc.communicate(timeout=STARTUP_DEADLINE)
            assert proc.returncode == 0, err.decode()
            if spec.accel == Accel.TCG:
                assert "warning" not in err.decode(), err.decode()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
