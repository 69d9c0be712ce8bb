"""Builder for the tiny vmhive test guest image.

The image is built offline from Debian packages only: the kernel image package
that ``linux-image-amd64`` depends on and ``busybox-static`` are fetched with
``apt-get download`` (no installation) and unpacked with ``dpkg-deb -x``.

Result, in the destination directory:

* ``tiny.qcow2``: an MBR-partitioned disk that boots from its own disk, both
  under SeaBIOS (syslinux in the MBR and on partition 1) and under UEFI/OVMF
  (systemd-boot as ``EFI/BOOT/BOOTX64.EFI`` on partition 1).

  - partition 1 (active, type 0xEF, FAT16, label ``VMHIVE-BOOT``): syslinux,
    systemd-boot, ``vmlinuz`` and ``initrd.img``;
  - partition 2 (type 0x83, ext4, label ``vmhive-root``): the busybox root
    filesystem, mounted read-write.

* ``vmlinuz`` and ``initrd.img``: the same kernel and initramfs, for QEMU direct
  kernel boot (``-kernel/-initrd/-append``, see :data:`DIRECT_BOOT_CMDLINE`).
* ``tiny.stamp``: JSON stamp with the hash of the builder's inputs; the build is
  skipped when it matches.

The guest prints :data:`READY_MARKER` on its own line on the serial console
(ttyS0) once booted, offers a password-less root shell on ttyS0, configures
every network interface by DHCP in the background and powers off cleanly on an
ACPI power-button event (QMP ``system_powerdown``).

Usage: ``build_tiny_image(dest)`` or ``python -m vmhive.guest.tiny DEST_DIR``.
The build needs the Debian packages in :data:`BUILD_PACKAGES` and apt package
lists (``apt-get update``); it is meant to run as root (the files of the root
filesystem are then owned by root in the guest) but needs no loop devices,
mounts or network other than the Debian archive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmhive.guest import buildkit
from vmhive.guest.buildkit import (
    MIB,
    CpioWriter,
    DiskLayout,
    GuestBuildError,
    ModuleIndex,
    boot_partition_files,
    builder_main,
    install_modules,
    locked,
    make_boot_disk,
    module_list,
    prepare_kernel,
    read_stamp,
    run_command,
)
from vmhive.guest.buildkit import (  # re-exported: the installer ISO builder uses it
    SYSTEMD_BOOT_EFI_CANDIDATES as SYSTEMD_BOOT_EFI_CANDIDATES,
)

#: Debian packages the build needs on the host (besides Python).
BUILD_PACKAGES: tuple[str, ...] = (
    "apt",  # apt-get download, apt-cache
    "dpkg",  # dpkg-deb -x
    "kmod",  # depmod
    "e2fsprogs",  # mkfs.ext4 -d
    "dosfstools",  # mkfs.vfat
    "mtools",  # mcopy, mmd (also used by syslinux)
    "syslinux",  # syslinux --install (BIOS boot on FAT)
    "syslinux-common",  # mbr.bin
    "systemd-boot-efi",  # systemd-bootx64.efi (UEFI boot)
    "fdisk",  # sfdisk
    "qemu-utils",  # qemu-img convert
    "xz-utils",  # only if the kernel ships .ko.xz modules (handled in Python)
    "zstd",  # only if the kernel ships .ko.zst modules
)

IMAGE_NAME = "tiny.qcow2"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
STAMP_NAME = "tiny.stamp"
LOCK_NAME = ".tiny.lock"

ROOT_LABEL = "vmhive-root"
BOOT_LABEL = "VMHIVE-BOOT"
READY_MARKER = "vmhive-guest-ready"

#: Kernel command line used by both on-disk bootloaders.
KERNEL_CMDLINE = f"console=ttyS0,115200 root=LABEL={ROOT_LABEL} quiet"
#: Suggested ``-append`` for QEMU direct kernel boot with dest/vmlinuz + dest/initrd.img.
DIRECT_BOOT_CMDLINE = KERNEL_CMDLINE

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the initramfs loads to find and mount the root filesystem.
INITRAMFS_MODULES: tuple[str, ...] = (
    "crc32c_generic",
    "ext4",
    "sd_mod",
    "ata_piix",
    "ata_generic",
    "ahci",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
)

#: Further modules loaded by the real root's rcS (all are also on the root fs).
ROOT_MODULES: tuple[str, ...] = (
    *INITRAMFS_MODULES,
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "e1000",
    "e1000e",
    "cdrom",
    "sr_mod",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "button",
    "evdev",
)

DISK_SIZE_MIB = 256
MIN_BOOT_PART_MIB = 32
DISK_LAYOUT = DiskLayout(
    disk_mib=DISK_SIZE_MIB,
    boot_label=BOOT_LABEL,
    root_label=ROOT_LABEL,
    min_boot_mib=MIN_BOOT_PART_MIB,
)

FILES_DIR = Path(__file__).resolve().parent / "files"

# files/<name> -> (path in the root filesystem, mode)
ROOT_FILES: dict[str, tuple[str, int]] = {
    "inittab": ("etc/inittab", 0o644),
    "rcS": ("etc/init.d/rcS", 0o755),
    "rcK": ("etc/init.d/rcK", 0o755),
    "profile": ("etc/profile", 0o644),
    "udhcpc.script": ("etc/udhcpc/default.script", 0o755),
    "acpi-power-button": ("etc/acpi/PWRF/00000080", 0o755),
    "vmhive-poweroff": ("sbin/vmhive-poweroff", 0o755),
    "hostname": ("etc/hostname", 0o644),
    "passwd": ("etc/passwd", 0o644),
    "group": ("etc/group", 0o644),
    "shadow": ("etc/shadow", 0o600),
    "fstab": ("etc/fstab", 0o644),
    "os-release": ("etc/os-release", 0o644),
}
INITRAMFS_FILES: dict[str, tuple[str, int]] = {
    "initramfs-init": ("init", 0o755),
}
# files/<name> -> path on the FAT boot partition; @CMDLINE@ is substituted
BOOT_FILES: dict[str, str] = {
    "syslinux.cfg": "syslinux.cfg",
    "loader.conf": "loader/loader.conf",
    "loader-entry.conf": "loader/entries/vmhive.conf",
}

ROOT_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc/init.d",
    "etc/vmhive",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "var/log",
    "root",
    "home",
    "mnt",
    "media/cdrom",
    "lib/modules",
)
INITRAMFS_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc/vmhive",
    "dev",
    "proc",
    "sys",
    "newroot",
    "lib/modules",
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- paths


def tiny_image_path(dest: Path) -> Path:
    """Path of the qcow2 disk image inside *dest* (whether or not it is built)."""
    return Path(dest) / IMAGE_NAME


def tiny_kernel_path(dest: Path) -> Path:
    """Path of the kernel for direct kernel boot inside *dest*."""
    return Path(dest) / KERNEL_NAME


def tiny_initrd_path(dest: Path) -> Path:
    """Path of the initramfs for direct kernel boot inside *dest*."""
    return Path(dest) / INITRD_NAME


# --------------------------------------------------------------------- subprocess


# ----------------------------------------------------------------------- packages


@dataclass(frozen=True)
class _Packages:
    kernel: str
    kernel_version: str
    busybox_version: str

    def as_dict(self) -> dict[str, str]:
        return {
            self.kernel: self.kernel_version,
            BUSYBOX_PACKAGE: self.busybox_version,
        }


def _candidate_fields(*packages: str) -> dict[str, dict[str, str]]:
    """Fields of the candidate versions of *packages*, from one apt-cache call."""
    try:
        out = run_command(["apt-cache", "show", "--no-all-versions", *packages])
    except GuestBuildError as exc:
        raise GuestBuildError(
            f"cannot look up {', '.join(packages)} (run 'apt-get update' first?): {exc}"
        ) from exc
    result: dict[str, dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            result.setdefault(fields["Package"], fields)
    missing = [p for p in packages if p not in result]
    if missing:
        raise GuestBuildError(f"apt-cache knows no candidate for {', '.join(missing)}")
    return result


def _resolve_packages() -> _Packages:
    """The kernel image package linux-image-amd64 depends on, and the versions to use."""
    fields = _candidate_fields(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
    kernel = kernel_version = ""
    for dep in fields[KERNEL_META_PACKAGE].get("Depends", "").split(","):
        name, _, constraint = dep.split("|")[0].strip().partition(" ")
        if name.startswith("linux-image-"):
            kernel = name
            constraint = constraint.strip("() ")
            if constraint.startswith("="):
                kernel_version = constraint[1:].strip()
            break
    if not kernel:
        raise GuestBuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image-* package")
    if not kernel_version:
        kernel_version = _candidate_fields(kernel)[kernel]["Version"]
    return _Packages(
        kernel=kernel,
        kernel_version=kernel_version,
        busybox_version=fields[BUSYBOX_PACKAGE]["Version"],
    )


def _download(packages: _Packages, debs: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    wanted = {packages.kernel: packages.kernel_version, BUSYBOX_PACKAGE: packages.busybox_version}
    for name, version in wanted.items():
        existing = _find_deb(debs, name, version)
        if existing is None:
            args = ["apt-get", "download", "-q"]
            if os.geteuid() == 0:
                # apt's _apt sandbox user cannot write into our private temp dir
                args += ["-o", "APT::Sandbox::User=root"]
            args.append(f"{name}={version}")
            log.info("downloading %s=%s", name, version)
            try:
                run_command(args, cwd=debs, timeout=1800)
            except GuestBuildError as exc:
                raise GuestBuildError(
                    f"cannot download {name}={version} (stale apt lists? run 'apt-get update'): "
                    f"{exc}"
                ) from exc
            existing = _find_deb(debs, name, version)
        if existing is None:
            raise GuestBuildError(f"apt-get download did not produce a .deb for {name}")
        found[name] = existing
    return found


def _find_deb(debs: Path, name: str, version: str) -> Path | None:
    quoted_version = version.replace(":", "%3a")
    for candidate in sorted(debs.glob(f"{name}_*.deb")):
        deb_version = candidate.name.split("_")[1]
        if deb_version in (version, quoted_version):
            return candidate
    return None


def _extract(deb: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    run_command(["dpkg-deb", "-x", deb, target])
    return target


# ------------------------------------------------------------------------ modules


# ------------------------------------------------------------------------ trees


def _read_file(name: str) -> str:
    path = FILES_DIR / name
    try:
        return path.read_text()
    except OSError as exc:
        raise GuestBuildError(f"guest file {path} missing: {exc}") from exc


def _write(root: Path, relpath: str, content: str | bytes, mode: int) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    path.chmod(mode)


def _install_busybox(busybox: Path, root: Path) -> None:
    target = root / "bin" / "busybox"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, target)
    target.chmod(0o755)
    applets = run_command([busybox, "--list-full"]).split()
    if "sbin/init" not in applets or "bin/sh" not in applets:
        raise GuestBuildError(f"{busybox} lacks the init or sh applet")
    for applet in applets:
        if applet == "bin/busybox" or applet.startswith("/") or ".." in applet:
            continue
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _make_root_tree(
    root: Path, busybox: Path, index: ModuleIndex, version: str, build_id: str
) -> None:
    for d in ROOT_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    _install_busybox(busybox, root)
    for name, (relpath, mode) in ROOT_FILES.items():
        _write(root, relpath, _read_file(name), mode)
    (root / "var" / "run").symlink_to("/run")
    _write(root, "etc/resolv.conf", "", 0o644)
    _write(root, "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tvmhive-guest\n", 0o644)
    _write(root, "etc/vmhive/image", f"{build_id}\n", 0o644)
    modules = index.closure(ROOT_MODULES)
    install_modules(index, version, modules, root)
    _write(root, "etc/vmhive/modules", module_list(modules), 0o644)


def _make_initramfs_tree(tree: Path, busybox: Path, index: ModuleIndex, version: str) -> None:
    for d in INITRAMFS_DIRS:
        (tree / d).mkdir(parents=True, exist_ok=True)
    _install_busybox(busybox, tree)
    for name, (relpath, mode) in INITRAMFS_FILES.items():
        _write(tree, relpath, _read_file(name), mode)
    modules = index.closure(INITRAMFS_MODULES)
    install_modules(index, version, modules, tree)
    _write(tree, "etc/vmhive/modules", module_list(modules), 0o644)


# ------------------------------------------------------------------------- cpio


def _make_initramfs(tree: Path, output: Path) -> None:
    writer = CpioWriter()
    writer.add_tree(tree)
    # The kernel opens /dev/console before running /init, before devtmpfs is up.
    writer.add_char_device("dev/console", 0o600, 5, 1)
    writer.add_char_device("dev/null", 0o666, 1, 3)
    output.write_bytes(gzip.compress(writer.finish(), compresslevel=9, mtime=0))


# ------------------------------------------------------------------------ disk


def _boot_files(kernel: Path, initrd: Path) -> dict[str, Path | str]:
    configs = {
        relpath: _read_file(name).replace("@CMDLINE@", KERNEL_CMDLINE)
        for name, relpath in BOOT_FILES.items()
    }
    return boot_partition_files(kernel, initrd, configs)


# ------------------------------------------------------------------------- cache


def _inputs_digest() -> str:
    """Hash of the builder source and the guest files directory."""
    h = hashlib.sha256()
    for source in (Path(__file__), Path(buildkit.__file__)):
        h.update(source.name.encode() + b"\0")
        h.update(source.read_bytes())
    if not FILES_DIR.is_dir():
        raise GuestBuildError(f"guest files directory {FILES_DIR} missing")
    for path in sorted(p for p in FILES_DIR.iterdir() if p.is_file()):
        h.update(b"\0file\0" + path.name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _build_id(inputs: str, packages: _Packages) -> str:
    h = hashlib.sha256(inputs.encode())
    for name, version in sorted(packages.as_dict().items()):
        h.update(f"\0{name}={version}".encode())
    return h.hexdigest()


def _outputs_present(dest: Path) -> bool:
    return all((dest / n).is_file() for n in (IMAGE_NAME, KERNEL_NAME, INITRD_NAME))


def _is_fresh(dest: Path, build_id: str) -> bool:
    stamp = read_stamp(dest / STAMP_NAME)
    return stamp is not None and stamp.get("build_id") == build_id and _outputs_present(dest)


# ------------------------------------------------------------------------- build


def build_tiny_image(dest: Path, work_dir: Path | None = None) -> Path:
    """Build (or reuse) the tiny guest image in *dest*; return the path of tiny.qcow2.

    Returns at once when ``dest/tiny.qcow2`` exists with a stamp matching the hash
    of the builder's inputs (this module, the ``files`` directory and the versions
    of the kernel and busybox packages). Otherwise builds in a temporary directory
    (inside *work_dir* if given, which then keeps the intermediate files) and
    renames the results into *dest*. Raises :class:`GuestBuildError` on failure.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    inputs = _inputs_digest()
    image = tiny_image_path(dest)
    try:
        packages = _resolve_packages()
    except GuestBuildError as exc:
        # No apt metadata (e.g. lists not fetched yet): an image built from the
        # same builder inputs is still usable; without one there is nothing to do.
        stamp = read_stamp(dest / STAMP_NAME)
        if stamp is not None and stamp.get("inputs") == inputs and _outputs_present(dest):
            log.warning("cannot check the package versions, reusing %s: %s", image, exc)
            return image
        raise
    build_id = _build_id(inputs, packages)
    if _is_fresh(dest, build_id):
        return image
    with locked(dest / LOCK_NAME):
        if _is_fresh(dest, build_id):  # built meanwhile by another process
            return image
        if work_dir is not None:
            work_dir = Path(work_dir).resolve()
            work_dir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="tiny-", dir=work_dir))
            _build(dest, work, packages, inputs, build_id)
        else:
            with tempfile.TemporaryDirectory(prefix="vmhive-tiny-") as tmp:
                _build(dest, Path(tmp), packages, inputs, build_id)
    return image


def _build(dest: Path, work: Path, packages: _Packages, inputs: str, build_id: str) -> None:
    log.info("building tiny guest image in %s (work dir %s)", dest, work)
    debs = _download(packages, work / "debs")
    kernel_root = _extract(debs[packages.kernel], work / "kernel")
    busybox_root = _extract(debs[BUSYBOX_PACKAGE], work / "busybox")
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"{busybox} missing from the {BUSYBOX_PACKAGE} package")
    version, vmlinuz, index = prepare_kernel(kernel_root)
    log.info("kernel %s (%s %s)", version, packages.kernel, packages.kernel_version)

    initramfs_tree = work / "initramfs"
    _make_initramfs_tree(initramfs_tree, busybox, index, version)
    initrd = work / INITRD_NAME
    _make_initramfs(initramfs_tree, initrd)

    root_tree = work / "root"
    _make_root_tree(root_tree, busybox, index, version, build_id)

    raw = work / "disk.raw"
    make_boot_disk(raw, _boot_files(vmlinuz, initrd), root_tree, work, DISK_LAYOUT)

    stage = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=dest))
    try:
        run_command(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, stage / IMAGE_NAME]
        )
        shutil.copyfile(vmlinuz, stage / KERNEL_NAME)
        shutil.copyfile(initrd, stage / INITRD_NAME)
        for name in (IMAGE_NAME, KERNEL_NAME, INITRD_NAME):
            (stage / name).chmod(0o644)
        stamp = {
            "build_id": build_id,
            "inputs": inputs,
            "packages": packages.as_dict(),
            "kernel_release": version,
            "cmdline": KERNEL_CMDLINE,
            "root_label": ROOT_LABEL,
        }
        (stage / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        # Invalidate first, publish the files, then the stamp last.
        (dest / STAMP_NAME).unlink(missing_ok=True)
        for name in (KERNEL_NAME, INITRD_NAME, IMAGE_NAME, STAMP_NAME):
            os.replace(stage / name, dest / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = (dest / IMAGE_NAME).stat().st_size
    log.info("built %s (%.1f MiB)", dest / IMAGE_NAME, size / MIB)


# -------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmhive.guest.tiny DEST_DIR``: build the image, print its path."""
    return builder_main(
        argv,
        prog="python -m vmhive.guest.tiny",
        description="Build the tiny vmhive test guest image.",
        build=lambda args: build_tiny_image(args.dest, args.work_dir),
    )


if __name__ == "__main__":
    sys.exit(main())
