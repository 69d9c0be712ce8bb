"""Validation of user input and the stored-VM -> VmSpec translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmhive.config import Settings
from vmhive.hypervisor.spec import BootDevice
from vmhive.services import specs
from vmhive.services.errors import InvalidRequest
from vmhive.services.host import resolve_alias
from vmhive.storage.qemu_img import parse_size
from vmhive.store.models import Cdrom, Disk, Nic, Vm


@pytest.mark.parametrize("name", ["a", "web-1", "x" * 63, "0db"])
def test_good_names(name: str) -> None:
    specs.check_name(name)


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a.b", "x" * 64, "web\n", "wé"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid VM name"):
        specs.check_name(name)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 1024**2),
        ("10G", 10 * 1024**3),
        ("1GiB", 1024**3),
        ("4096", 4096),
        ("2t", 2 * 1024**4),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1G", "10X", "ten"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_boot_order() -> None:
    assert specs.parse_boot_order("cdrom, disk") == (BootDevice.CDROM, BootDevice.DISK)
    for bad in ("", "disk,disk", "floppy"):
        with pytest.raises(InvalidRequest):
            specs.parse_boot_order(bad)


def test_paths_must_stay_under_allowed_roots(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    iso = root / "a.iso"
    iso.write_bytes(b"x")
    assert specs.check_path_under(str(iso), [root], "ISO") == iso
    (tmp_path / "secret").write_text("s")
    for bad in (str(root / ".." / "secret"), "/etc/passwd", str(root / "missing.iso")):
        with pytest.raises(InvalidRequest):
            specs.check_path_under(bad, [root], "ISO")
    link = root / "link.iso"
    link.symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidRequest, match="outside"):
        specs.check_path_under(str(link), [root], "ISO")


def test_macs() -> None:
    assert specs.check_mac("52:54:00:AB:cd:01") == "52:54:00:ab:cd:01"
    for bad in ("01:00:5e:00:00:01", "52:54:00:00:00", "zz:54:00:00:00:00", "52:54:00:00:00:00\n"):
        with pytest.raises(InvalidRequest):
            specs.check_mac(bad)
    taken = {"52:54:00:00:00:01"}
    mac = specs.random_mac(taken)
    assert mac.startswith("52:54:00:") and mac not in taken


def test_resolve_alias() -> None:
    text = "pc    Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\nq35   Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
    assert resolve_alias(text, "q35") == "pc-q35-7.2"
    with pytest.raises(RuntimeError):
        resolve_alias(text, "microvm")


def test_build_spec_from_stored_vm(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    vm = Vm(
        uuid="8f4c3d1e-0000-4000-8000-000000000001", name="web", generation=2, vcpus=2,
        memory_mib=256, machine="pc-q35-7.2", boot_order="cdrom,disk", kernel=None,
    )  # fmt: skip
    vm.disks.append(
        Disk(index=0, path="/d/disk0.qcow2", format="qcow2", size_bytes=1, source="blank")
    )
    vm.cdroms.append(Cdrom(index=0, iso=None))
    vm.nics.append(Nic(index=0, mac="52:54:00:00:00:01", model=None, backend="user"))
    spec = specs.build_spec(settings, vm, "tcg")
    assert (
        spec.firmware is not None
        and spec.firmware.vars == tmp_path / "vms" / vm.uuid / "OVMF_VARS.fd"
    )
    assert spec.runtime.run_dir == tmp_path / "run" / vm.uuid
    assert spec.boot_order == (BootDevice.CDROM, BootDevice.DISK)
    assert [d.path for d in spec.disks] == [Path("/d/disk0.qcow2")]
    assert spec.cdroms[0].iso is None and spec.nics[0].mac == "52:54:00:00:00:01"
