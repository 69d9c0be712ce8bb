"""Builder for a bootable installer ISO of the tiny vmhive test guest.

The ISO serves the "install an OS from an ISO onto a blank disk" flow (as with
Hyper-V or virt-install): boot a VM with the ISO as CD-ROM and an empty disk,
the installer writes the tiny guest onto the disk and powers the VM off; the
disk then boots on its own (BIOS or UEFI, like ``tiny.qcow2``).

Layout of ``tiny-installer.iso`` (ISO 9660 with Rock Ridge, made with
``xorriso -as mkisofs``):

* ``isolinux/``: ISOLINUX, the El Torito BIOS boot image (SeaBIOS);
* ``boot/efi.img``: the El Torito EFI boot image, a small FAT filesystem with
  systemd-boot as ``EFI/BOOT/BOOTX64.EFI``, its loader entry, the kernel and
  the installer initramfs (OVMF);
* ``boot/vmlinuz`` and ``boot/initrd.img``: the kernel and installer initramfs
  for ISOLINUX;
* ``tiny.img.gz``: the tiny guest's disk as a gzip'd raw image.

Both boot entries start the tiny guest's kernel with the *installer initramfs*:
the tiny guest's ``initrd.img`` with ``/init`` replaced by
``installer_files/installer-init`` and with the CD-ROM and ISO 9660 modules
(which the tiny initramfs lacks) taken from the tiny image's root filesystem.
That init prints :data:`START_MARKER`, writes the image onto the first blank
disk (first MiB all zeros, at least the image's size), prints
:data:`DONE_MARKER` and powers off; on failure it prints
``vmhive-installer-error: <reason>`` (:data:`ERROR_PREFIX`) and powers off.

Usage: ``build_installer_iso(dest, tiny_dir)`` or
``python -m vmhive.guest.installer DEST_DIR TINY_DIR``. *tiny_dir* must hold a
built tiny image (:func:`vmhive.guest.tiny.build_tiny_image`). The result is
cached by a stamp keyed on the tiny image's build id, this module, the
``installer_files`` directory and the host boot loader binaries.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmhive.guest import buildkit
from vmhive.guest.buildkit import (
    CpioWriter,
    ModuleIndex,
    builder_main,
    first_existing,
    install_modules,
    locked,
    module_list,
    read_stamp,
    run_command,
)
from vmhive.guest.tiny import (
    INITRD_NAME,
    KERNEL_NAME,
    SYSTEMD_BOOT_EFI_CANDIDATES,
    GuestBuildError,
    build_tiny_image,
    tiny_image_path,
    tiny_initrd_path,
    tiny_kernel_path,
)
from vmhive.guest.tiny import (
    STAMP_NAME as TINY_STAMP_NAME,
)

#: Debian packages the build needs on the host, besides those of the tiny image
#: (:data:`vmhive.guest.tiny.BUILD_PACKAGES`).
BUILD_PACKAGES: tuple[str, ...] = (
    "xorriso",  # xorriso -as mkisofs
    "isolinux",  # isolinux.bin (El Torito BIOS boot)
    "syslinux-common",  # ldlinux.c32
    "systemd-boot-efi",  # systemd-bootx64.efi (El Torito EFI boot)
    "dosfstools",  # mkfs.vfat (EFI boot image)
    "mtools",  # mmd, mcopy
    "e2fsprogs",  # debugfs (modules from the tiny root filesystem)
    "kmod",  # depmod
    "qemu-utils",  # qemu-img convert
)

ISO_NAME = "tiny-installer.iso"
STAMP_NAME = "tiny-installer.stamp"
LOCK_NAME = ".tiny-installer.lock"

VOLUME_ID = "VMHIVE_INSTALL"
#: Path of the compressed raw disk image on the ISO.
IMAGE_ON_ISO = "tiny.img.gz"

START_MARKER = "vmhive-installer-start"
DONE_MARKER = "vmhive-installer-done"
ERROR_PREFIX = "vmhive-installer-error:"

#: Kernel command line of both installer boot entries.
INSTALLER_CMDLINE = "console=ttyS0,115200 quiet"

#: Modules the installer loads: disk and CD-ROM controllers, disks, CD-ROMs and
#: ISO 9660 (plus their dependencies). All are on the tiny guest's root fs.
INSTALLER_MODULES: tuple[str, ...] = (
    "ata_piix",
    "ata_generic",
    "ahci",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "cdrom",
    "sr_mod",
    "isofs",
)

ISOLINUX_BIN_CANDIDATES = (
    Path("/usr/lib/ISOLINUX/isolinux.bin"),
    Path("/usr/lib/syslinux/isolinux.bin"),
)
LDLINUX_C32_CANDIDATES = (
    Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"),
    Path("/usr/lib/syslinux/ldlinux.c32"),
)

FILES_DIR = Path(__file__).resolve().parent / "installer_files"

MIB = 1024 * 1024
SECTOR = 512
_LINUX_PARTITION_TYPE = 0x83
_GPT_PROTECTIVE_TYPE = 0xEE

log = logging.getLogger(__name__)


class InstallerBuildError(GuestBuildError):
    """Building the installer ISO failed."""


def installer_iso_path(dest: Path) -> Path:
    """Path of the installer ISO inside *dest* (whether or not it is built)."""
    return Path(dest) / ISO_NAME


# --------------------------------------------------------------------- helpers


def _run(
    args: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, timeout: float = 600
) -> str:
    """Run a command, return its stdout; raise InstallerBuildError on any failure."""
    return run_command(args, cwd=cwd, timeout=timeout, error=InstallerBuildError)


def _first_existing(candidates: Sequence[Path], what: str, package: str) -> Path:
    return first_existing(candidates, what, package, error=InstallerBuildError)


def _read_file(name: str) -> str:
    path = FILES_DIR / name
    try:
        return path.read_text()
    except OSError as exc:
        raise InstallerBuildError(f"installer file {path} missing: {exc}") from exc


def _boot_binaries() -> dict[str, Path]:
    return {
        "isolinux.bin": _first_existing(ISOLINUX_BIN_CANDIDATES, "isolinux.bin", "isolinux"),
        "ldlinux.c32": _first_existing(LDLINUX_C32_CANDIDATES, "ldlinux.c32", "syslinux-common"),
        "BOOTX64.EFI": _first_existing(
            SYSTEMD_BOOT_EFI_CANDIDATES, "systemd-boot EFI binary", "systemd-boot-efi"
        ),
    }


# ----------------------------------------------------------------------- cache


def _tiny_build_id(tiny_dir: Path) -> tuple[str, dict[str, object]]:
    """The tiny image's build id and stamp; InstallerBuildError if it is not built."""
    stamp_path = tiny_dir / TINY_STAMP_NAME
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError) as exc:
        raise InstallerBuildError(
            f"no tiny guest image in {tiny_dir} ({stamp_path}: {exc}); build it first "
            "(python -m vmhive.guest.tiny DIR)"
        ) from exc
    build_id = stamp.get("build_id") if isinstance(stamp, dict) else None
    if not isinstance(build_id, str) or not build_id:
        raise InstallerBuildError(f"{stamp_path} holds no build_id")
    for path in (tiny_image_path(tiny_dir), tiny_kernel_path(tiny_dir), tiny_initrd_path(tiny_dir)):
        if not path.is_file():
            raise InstallerBuildError(f"{path} missing: rebuild the tiny guest image")
    return build_id, stamp


def _cache_key(tiny_build_id: str, binaries: dict[str, Path]) -> str:
    h = hashlib.sha256(b"tiny\0" + tiny_build_id.encode())
    h.update(b"\0installer.py\0")
    h.update(Path(__file__).read_bytes())
    h.update(Path(buildkit.__file__).read_bytes())  # the cpio writer and module index
    if not FILES_DIR.is_dir():
        raise InstallerBuildError(f"installer files directory {FILES_DIR} missing")
    for path in sorted(p for p in FILES_DIR.iterdir() if p.is_file()):
        h.update(b"\0file\0" + path.name.encode() + b"\0")
        h.update(path.read_bytes())
    for name, path in sorted(binaries.items()):
        h.update(b"\0host\0" + name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _is_fresh(dest: Path, key: str) -> bool:
    stamp = read_stamp(dest / STAMP_NAME)
    return stamp is not None and stamp.get("key") == key and installer_iso_path(dest).is_file()


# ------------------------------------------------------------------ disk image


def _root_partition_offset(raw: Path) -> int:
    """Byte offset of the (last) Linux partition in the MBR of a raw disk image."""
    with raw.open("rb") as f:
        mbr = f.read(SECTOR)
    if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
        raise InstallerBuildError(f"{raw} has no MBR partition table")
    offset = 0
    for i in range(4):
        entry = mbr[446 + 16 * i : 446 + 16 * (i + 1)]
        ptype = entry[4]
        start, _size = struct.unpack("<II", entry[8:16])
        if ptype == _GPT_PROTECTIVE_TYPE:
            raise InstallerBuildError(f"{raw} is GPT-partitioned; only MBR is supported")
        if ptype == _LINUX_PARTITION_TYPE:
            offset = start * SECTOR
    if not offset:
        raise InstallerBuildError(f"{raw} has no Linux (0x83) partition")
    return offset


def _compress(raw: Path, output: Path) -> None:
    # No file name and mtime 0 in the gzip header: same input, same output.
    with (
        raw.open("rb") as fin,
        output.open("wb") as fout,
        gzip.GzipFile(filename="", mode="wb", fileobj=fout, compresslevel=6, mtime=0) as gz,
    ):
        shutil.copyfileobj(fin, gz, MIB)


def _extract_root_modules(raw: Path, offset: int, work: Path) -> tuple[str, Path]:
    """Copy /lib/modules out of the ext4 root filesystem; return (version, moddir).

    debugfs reads the filesystem inside the disk image directly (``?offset=``),
    so no loop device or mount is needed.
    """
    target = work / "rootfs-modules"
    target.mkdir()
    for source in ("/lib/modules", "/usr/lib/modules"):
        # cwd + relative target: debugfs splits its request on blanks
        _run(["debugfs", "-R", f"rdump {source} .", f"{raw}?offset={offset}"], cwd=target)
        moddir = target / "modules"
        if moddir.is_dir():
            break
    else:
        raise InstallerBuildError(f"no /lib/modules in the root filesystem of {raw}")
    versions = sorted(p for p in moddir.iterdir() if p.is_dir())
    if len(versions) != 1:
        raise InstallerBuildError(f"expected one kernel version in the root fs, found {versions}")
    return versions[0].name, versions[0]


# -------------------------------------------------------------------- initramfs


@dataclass(frozen=True)
class _CharDevice:
    name: str
    perms: int
    major: int
    minor: int


_NEWC_MAGICS = (b"070701", b"070702")
_NEWC_HEADER = 110


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _unpack_cpio(data: bytes, tree: Path) -> list[_CharDevice]:
    """Unpack (concatenated) cpio newc archives into *tree*.

    Returns the character devices (not created on disk: that would need
    mknod); hard links, block devices and FIFOs are not supported (the tiny
    initramfs has none).
    """
    devices: list[_CharDevice] = []
    dir_modes: list[tuple[Path, int]] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 6] not in _NEWC_MAGICS:
            if data[pos] == 0:  # padding after a trailer (between or after archives)
                pos = len(data) - len(data[pos:].lstrip(b"\0"))
                continue
            raise InstallerBuildError(f"initramfs: no cpio newc header at offset {pos}")
        try:
            fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise InstallerBuildError(f"initramfs: bad cpio header at offset {pos}") from exc
        mode, nlink, filesize = fields[1], fields[4], fields[6]
        rmajor, rminor, namesize = fields[9], fields[10], fields[11]
        name_start = pos + _NEWC_HEADER
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = pos + _align4(_NEWC_HEADER + namesize)
        content = data[data_start : data_start + filesize]
        pos = data_start + _align4(filesize)
        if name == "TRAILER!!!":
            continue
        name = name.lstrip("/")
        if name in ("", "."):
            continue
        if ".." in name.split("/"):
            raise InstallerBuildError(f"initramfs: unsafe path {name!r}")
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kind, perms = stat.S_IFMT(mode), stat.S_IMODE(mode)
        if kind == stat.S_IFDIR:
            path.mkdir(exist_ok=True)
            dir_modes.append((path, perms))
        elif kind == stat.S_IFREG:
            if nlink > 1:
                raise InstallerBuildError(f"initramfs: hard link {name!r} not supported")
            path.write_bytes(content)
            path.chmod(perms)
        elif kind == stat.S_IFLNK:
            path.symlink_to(content.decode())
        elif kind == stat.S_IFCHR:
            devices.append(_CharDevice(name, perms, rmajor, rminor))
        else:
            raise InstallerBuildError(f"initramfs: unsupported file type {mode:o} of {name!r}")
    for path, perms in reversed(dir_modes):
        path.chmod(perms)
    return devices


def _make_installer_initrd(
    tiny_initrd: Path,
    modules_dir: Path,
    version: str,
    image_bytes: int,
    work: Path,
) -> Path:
    """The tiny initramfs with the installer /init and the installer's modules."""
    try:
        archive = gzip.decompress(tiny_initrd.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise InstallerBuildError(
            f"{tiny_initrd} is not a gzip-compressed cpio archive: {exc}"
        ) from exc
    tree = work / "initramfs"
    tree.mkdir()
    devices = _unpack_cpio(archive, tree)
    if not (tree / "bin" / "busybox").is_file():
        raise InstallerBuildError(f"{tiny_initrd} has no /bin/busybox")

    # Replace the modules: the tiny initramfs lacks the CD-ROM and ISO 9660 ones.
    shutil.rmtree(tree / "lib" / "modules", ignore_errors=True)
    index = ModuleIndex.load(modules_dir)
    modules = index.closure(INSTALLER_MODULES)
    install_modules(index, version, modules, tree)
    (tree / "etc" / "vmhive").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "vmhive" / "modules").write_text(module_list(modules))

    init = tree / "init"
    init.unlink(missing_ok=True)
    init.write_text(_read_file("installer-init"))
    init.chmod(0o755)
    conf = (
        "# written by vmhive.guest.installer\n"
        f"INSTALLER_IMAGE={IMAGE_ON_ISO}\n"
        f"INSTALLER_IMAGE_BYTES={image_bytes}\n"
        f"INSTALLER_IMAGE_MIB={-(-image_bytes // MIB)}\n"
        f"INSTALLER_IMAGE_RECORDS={image_bytes // MIB}+{int(image_bytes % MIB != 0)}\n"
    )
    (tree / "etc" / "vmhive" / "installer.conf").write_text(conf)

    writer = CpioWriter()
    writer.add_tree(tree)
    for dev in devices:
        writer.add_char_device(dev.name, dev.perms, dev.major, dev.minor)
    output = work / "installer-initrd.img"
    output.write_bytes(gzip.compress(writer.finish(), compresslevel=9, mtime=0))
    return output


# ------------------------------------------------------------------------- ISO


def _make_efi_image(output: Path, files: dict[str, Path | str], work: Path) -> None:
    """A FAT image holding *files* (path in the image -> host file or text)."""
    staging = work / "efi-staging"
    dirs: set[str] = set()
    payload = 0
    for relpath, content in files.items():
        local = staging / relpath
        local.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, local)
        else:
            local.write_text(content)
        payload += local.stat().st_size
        parent = relpath.rpartition("/")[0]
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    size_mib = -(-(payload + payload // 8 + 2 * MIB) // MIB)
    with output.open("wb") as f:
        f.truncate(size_mib * MIB)
    _run(["mkfs.vfat", "-n", "VMHIVE-EFI", "--invariant", output])
    for d in sorted(dirs, key=lambda p: p.count("/")):
        _run(["mmd", "-i", output, f"::/{d}"])
    for relpath in sorted(files):
        _run(["mcopy", "-o", "-i", output, staging / relpath, f"::/{relpath}"])


def _make_iso(tree: Path, output: Path) -> None:
    _run(
        [
            "xorriso",
            "-as",
            "mkisofs",
            "-quiet",
            "-o",
            output,
            "-V",
            VOLUME_ID,
            "-R",
            # BIOS: ISOLINUX, no emulation
            "-b",
            "isolinux/isolinux.bin",
            "-c",
            "isolinux/boot.cat",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            # UEFI: the FAT image is the EFI system "partition" of the CD
            "-eltorito-alt-boot",
            "-e",
            "boot/efi.img",
            "-no-emul-boot",
            tree,
        ],
        timeout=900,
    )


# ------------------------------------------------------------------------ build


def build_installer_iso(dest: Path, tiny_dir: Path, work_dir: Path | None = None) -> Path:
    """Build (or reuse) ``dest/tiny-installer.iso`` from the tiny image in *tiny_dir*.

    Returns at once when the ISO exists with a stamp matching the tiny image's
    build id, this module, ``installer_files`` and the host's isolinux,
    ldlinux.c32 and systemd-boot binaries. Otherwise builds in a temporary
    directory (inside *work_dir* if given, which then keeps the intermediate
    files) and renames the ISO into *dest*. *tiny_dir* is only read. Raises
    :class:`InstallerBuildError` on failure (also when the tiny image is not
    built).
    """
    dest = Path(dest).resolve()
    tiny_dir = Path(tiny_dir).resolve()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        binaries = _boot_binaries()
        tiny_build_id, _ = _tiny_build_id(tiny_dir)
        key = _cache_key(tiny_build_id, binaries)
        iso = installer_iso_path(dest)
        if _is_fresh(dest, key):
            return iso
        with locked(dest / LOCK_NAME):
            if _is_fresh(dest, key):  # built meanwhile by another process
                return iso
            if work_dir is not None:
                work_dir = Path(work_dir).resolve()
                work_dir.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(prefix="installer-", dir=work_dir))
                _build(dest, tiny_dir, work, binaries, tiny_build_id, key)
            else:
                with tempfile.TemporaryDirectory(prefix="vmhive-installer-") as tmp:
                    _build(dest, tiny_dir, Path(tmp), binaries, tiny_build_id, key)
        return iso
    except InstallerBuildError:
        raise
    except GuestBuildError as exc:  # from the helpers shared with tiny.py
        raise InstallerBuildError(str(exc)) from exc
    except OSError as exc:
        raise InstallerBuildError(f"building the installer ISO in {dest} failed: {exc}") from exc


def _build(
    dest: Path,
    tiny_dir: Path,
    work: Path,
    binaries: dict[str, Path],
    tiny_build_id: str,
    key: str,
) -> None:
    log.info("building the installer ISO in %s from %s (work dir %s)", dest, tiny_dir, work)
    # Take everything from tiny_dir first, then check that it was not rebuilt
    # meanwhile (tiny.py removes its stamp before publishing new files).
    kernel = work / KERNEL_NAME
    shutil.copyfile(tiny_kernel_path(tiny_dir), kernel)
    tiny_initrd = work / "tiny-initrd.img"
    shutil.copyfile(tiny_initrd_path(tiny_dir), tiny_initrd)
    raw = work / "disk.raw"
    _run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", tiny_image_path(tiny_dir), raw])
    build_id_after, tiny_stamp = _tiny_build_id(tiny_dir)
    if build_id_after != tiny_build_id:
        raise InstallerBuildError(f"the tiny image in {tiny_dir} changed during the build; retry")

    image_bytes = raw.stat().st_size
    version, modules_dir = _extract_root_modules(raw, _root_partition_offset(raw), work)
    release = tiny_stamp.get("kernel_release")
    if release and release != version:
        raise InstallerBuildError(
            f"root fs modules are for kernel {version}, the tiny stamp says {release}"
        )
    initrd = _make_installer_initrd(tiny_initrd, modules_dir, version, image_bytes, work)

    tree = work / "iso"
    (tree / "isolinux").mkdir(parents=True)
    (tree / "boot").mkdir()
    shutil.copyfile(binaries["isolinux.bin"], tree / "isolinux" / "isolinux.bin")
    shutil.copyfile(binaries["ldlinux.c32"], tree / "isolinux" / "ldlinux.c32")
    (tree / "isolinux" / "isolinux.cfg").write_text(
        _read_file("isolinux.cfg").replace("@CMDLINE@", INSTALLER_CMDLINE)
    )
    shutil.copyfile(kernel, tree / "boot" / KERNEL_NAME)
    shutil.copyfile(initrd, tree / "boot" / INITRD_NAME)
    _make_efi_image(
        tree / "boot" / "efi.img",
        {
            "EFI/BOOT/BOOTX64.EFI": binaries["BOOTX64.EFI"],
            "loader/loader.conf": _read_file("loader.conf"),
            "loader/entries/install.conf": _read_file("loader-entry.conf").replace(
                "@CMDLINE@", INSTALLER_CMDLINE
            ),
            KERNEL_NAME: kernel,
            INITRD_NAME: initrd,
        },
        work,
    )
    log.info("compressing the %d MiB disk image", image_bytes // MIB)
    _compress(raw, tree / IMAGE_ON_ISO)
    raw.unlink()

    stage = Path(tempfile.mkdtemp(prefix=".installer-build-", dir=dest))
    try:
        staged_iso = stage / ISO_NAME
        _make_iso(tree, staged_iso)
        staged_iso.chmod(0o644)
        stamp = {
            "key": key,
            "tiny_build_id": tiny_build_id,
            "kernel_release": version,
            "cmdline": INSTALLER_CMDLINE,
            "image": IMAGE_ON_ISO,
            "image_bytes": image_bytes,
            "iso_bytes": staged_iso.stat().st_size,
        }
        (stage / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        # Invalidate first, publish the ISO, then the stamp last.
        (dest / STAMP_NAME).unlink(missing_ok=True)
        os.replace(staged_iso, dest / ISO_NAME)
        os.replace(stage / STAMP_NAME, dest / STAMP_NAME)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = (dest / ISO_NAME).stat().st_size
    log.info("built %s (%.1f MiB)", dest / ISO_NAME, size / MIB)


# -------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmhive.guest.installer DEST_DIR TINY_DIR``: build, print the ISO path."""

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("tiny_dir", type=Path, help="directory of the built tiny guest image")
        parser.add_argument(
            "--build-tiny", action="store_true", help="build (or refresh) the tiny image first"
        )

    def build(args: argparse.Namespace) -> Path:
        if args.build_tiny:
            build_tiny_image(args.tiny_dir)
        return build_installer_iso(args.dest, args.tiny_dir, args.work_dir)

    return builder_main(
        argv,
        prog="python -m vmhive.guest.installer",
        description="Build the installer ISO of the tiny vmhive test guest.",
        build=build,
        extra_args=extra,
    )


if __name__ == "__main__":
    sys.exit(main())
