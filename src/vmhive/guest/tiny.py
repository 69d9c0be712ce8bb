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

import argparse
import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
BOOT_PART_START_SECTOR = 2048  # 1 MiB alignment
MIN_BOOT_PART_MIB = 32

SECTOR = 512
MIB = 1024 * 1024

SYSTEMD_BOOT_EFI_CANDIDATES = (
    Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
    Path("/lib/systemd/boot/efi/systemd-bootx64.efi"),
)
SYSLINUX_MBR_CANDIDATES = (
    Path("/usr/lib/syslinux/mbr/mbr.bin"),
    Path("/usr/lib/SYSLINUX/mbr.bin"),
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


class GuestBuildError(RuntimeError):
    """Building the tiny guest image failed."""


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


def _run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    timeout: float = 600,
    error: type[GuestBuildError] | None = None,
    packages: Sequence[str] | None = None,
) -> str:
    """Run a command, return its stdout; raise `error` (GuestBuildError) on any failure.

    `error` and `packages` let other image builders (the installer ISO) reuse
    this with their own exception and package list.
    """
    fail = error or GuestBuildError
    argv = [os.fspath(a) for a in args]
    log.debug("running %s", argv)
    env = dict(os.environ, LC_ALL="C", MTOOLS_SKIP_CHECK="1")
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            input=input_bytes,
            capture_output=True,
            check=False,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise fail(f"command timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise fail(
            f"command not found: {argv[0]} (install the Debian packages "
            f"{', '.join(packages or BUILD_PACKAGES)})"
        ) from exc
    stdout = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise fail(
            f"command failed with exit code {proc.returncode}: {' '.join(argv)}\n"
            f"{stderr or stdout.strip()}"
        )
    return stdout


def _first_existing(
    candidates: Iterable[Path],
    what: str,
    package: str,
    error: type[GuestBuildError] | None = None,
) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise (error or GuestBuildError)(f"{what} not found (install the Debian package {package})")


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
        out = _run(["apt-cache", "show", "--no-all-versions", *packages])
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
                _run(args, cwd=debs, timeout=1800)
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
    _run(["dpkg-deb", "-x", deb, target])
    return target


# ------------------------------------------------------------------------ modules


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return _norm(base)


@dataclass
class _ModuleIndex:
    """The kernel package's module metadata (modules.dep, .alias, .softdep, .builtin)."""

    moddir: Path
    deps: dict[str, list[str]] = field(default_factory=dict)  # relpath -> relpaths
    by_name: dict[str, str] = field(default_factory=dict)  # name -> relpath
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (pattern, name)
    softdeps: dict[str, list[str]] = field(default_factory=dict)  # name -> names
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, moddir: Path) -> _ModuleIndex:
        index = cls(moddir)
        dep_file = moddir / "modules.dep"
        if not dep_file.is_file():
            raise GuestBuildError(f"{dep_file} missing (depmod failed?)")
        for line in dep_file.read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            mod = mod.strip()
            index.deps[mod] = rest.split()
            index.by_name[_module_name(mod)] = mod
        alias_file = moddir / "modules.alias"
        if alias_file.is_file():
            for line in alias_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias":
                    index.aliases.append((parts[1], _norm(parts[2])))
        softdep_file = moddir / "modules.softdep"
        if softdep_file.is_file():
            for line in softdep_file.read_text().splitlines():
                parts = line.split()
                if len(parts) < 3 or parts[0] != "softdep":
                    continue
                names = [p for p in parts[2:] if p not in ("pre:", "post:")]
                index.softdeps.setdefault(_norm(parts[1]), []).extend(names)
        builtin_file = moddir / "modules.builtin"
        if builtin_file.is_file():
            for line in builtin_file.read_text().splitlines():
                if line.strip():
                    index.builtin.add(_module_name(line.strip()))
        return index

    def lookup(self, name: str) -> list[str]:
        """Module relpaths providing *name* (module name or alias); [] if built in."""
        norm = _norm(name)
        if norm in self.by_name:
            return [self.by_name[norm]]
        if norm in self.builtin:
            return []
        matches = sorted(
            {
                mod
                for pattern, mod in self.aliases
                if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(norm, pattern)
            }
        )
        paths = [self.by_name[m] for m in matches if m in self.by_name]
        if paths or any(m in self.builtin for m in matches):
            return paths
        raise GuestBuildError(f"kernel module {name!r} not found in {self.moddir}")

    def closure(self, names: Iterable[str]) -> list[tuple[str, bool]]:
        """*names* plus their hard and soft dependencies, dependencies first.

        Returns (relpath, required) pairs. Modules pulled in only as soft
        dependencies (e.g. CPU-specific crypto like crc32c_intel, which cannot
        load on every CPU) are not required.
        """
        ordered: list[str] = []
        required: dict[str, bool] = {}

        def visit(relpath: str, req: bool, stack: tuple[str, ...]) -> None:
            if relpath in required:
                if req and not required[relpath]:
                    required[relpath] = True
                    for dep in self.deps.get(relpath, []):
                        visit(dep, True, (*stack, relpath))
                return
            if relpath in stack:
                raise GuestBuildError(f"module dependency loop: {' -> '.join(stack)}")
            for softdep in self.softdeps.get(_module_name(relpath), []):
                for dep in self.lookup(softdep):
                    visit(dep, False, (*stack, relpath))
            # modules.dep lists the full closure; the last entries are the deepest.
            for dep in reversed(self.deps.get(relpath, [])):
                visit(dep, req, (*stack, relpath))
            required[relpath] = req
            ordered.append(relpath)

        for name in names:
            for relpath in self.lookup(name):
                visit(relpath, True, ())
        return [(relpath, required[relpath]) for relpath in ordered]


def _find_moddir(kernel_root: Path) -> tuple[str, Path]:
    for base in (kernel_root / "lib" / "modules", kernel_root / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p for p in base.iterdir() if p.is_dir())
            if len(versions) == 1:
                return versions[0].name, versions[0]
            if versions:
                raise GuestBuildError(f"several kernel versions in {base}: {versions}")
    raise GuestBuildError(f"no lib/modules/<version> directory in {kernel_root}")


def _prepare_kernel(kernel_root: Path) -> tuple[str, Path, _ModuleIndex]:
    """Return (kernel version, vmlinuz path, module index) of an unpacked kernel package."""
    version, moddir = _find_moddir(kernel_root)
    vmlinuz = kernel_root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise GuestBuildError(f"{vmlinuz} missing from the kernel package")
    if moddir.parent != kernel_root / "lib" / "modules":
        # depmod -b BASE looks in BASE/lib/modules
        (kernel_root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
        (kernel_root / "lib" / "modules" / version).symlink_to(moddir)
        moddir = kernel_root / "lib" / "modules" / version
    if not (moddir / "modules.dep").is_file():
        # Debian's package leaves modules.dep to its postinst: generate it here.
        _run(["depmod", "-b", kernel_root, version])
    return version, vmlinuz, _ModuleIndex.load(moddir)


def _install_modules(
    index: _ModuleIndex, version: str, modules: Sequence[tuple[str, bool]], root: Path
) -> None:
    """Copy (decompressing) *relpaths* into ROOT/lib/modules/VERSION and run depmod."""
    target = root / "lib" / "modules" / version
    target.mkdir(parents=True, exist_ok=True)
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        if (index.moddir / name).is_file():
            shutil.copyfile(index.moddir / name, target / name)
    for relpath, _required in modules:
        src = index.moddir / relpath
        base = relpath
        for suffix in (".xz", ".zst", ".gz"):
            if relpath.endswith(".ko" + suffix):
                base = relpath[: -len(suffix)]
        dst = target / base
        dst.parent.mkdir(parents=True, exist_ok=True)
        if relpath.endswith(".ko.xz"):
            with lzma.open(src) as fin, dst.open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif relpath.endswith(".ko.gz"):
            with gzip.open(src) as fin, dst.open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif relpath.endswith(".ko.zst"):
            _run(["zstd", "-q", "-d", "-f", "-o", dst, src])
        else:
            shutil.copyfile(src, dst)
        dst.chmod(0o644)
    _run(["depmod", "-b", root, version])
    if not (target / "modules.dep").is_file():
        raise GuestBuildError(f"depmod produced no modules.dep in {target}")


def _module_list(modules: Iterable[tuple[str, bool]]) -> str:
    """Load list for the guest scripts: one module a line, 'optional' if it may fail."""
    return "".join(f"{_module_name(r)}{'' if req else ' optional'}\n" for r, req in modules)


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
    applets = _run([busybox, "--list-full"]).split()
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
    root: Path, busybox: Path, index: _ModuleIndex, version: str, build_id: str
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
    _install_modules(index, version, modules, root)
    _write(root, "etc/vmhive/modules", _module_list(modules), 0o644)


def _make_initramfs_tree(tree: Path, busybox: Path, index: _ModuleIndex, version: str) -> None:
    for d in INITRAMFS_DIRS:
        (tree / d).mkdir(parents=True, exist_ok=True)
    _install_busybox(busybox, tree)
    for name, (relpath, mode) in INITRAMFS_FILES.items():
        _write(tree, relpath, _read_file(name), mode)
    modules = index.closure(INITRAMFS_MODULES)
    _install_modules(index, version, modules, tree)
    _write(tree, "etc/vmhive/modules", _module_list(modules), 0o644)


# ------------------------------------------------------------------------- cpio


class _CpioWriter:
    """Minimal deterministic cpio 'newc' archive writer (what the kernel unpacks)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._chunks.append(header + encoded + b"\0" * ((4 - (len(header) + len(encoded)) % 4) % 4))
        self._chunks.append(data + b"\0" * ((4 - len(data) % 4) % 4))

    def add_tree(self, tree: Path) -> None:
        for path in sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).parts):
            name = path.relative_to(tree).as_posix()
            st = path.lstat()
            perms = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                self._entry(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                self._entry(name, stat.S_IFDIR | perms, nlink=2)
            elif stat.S_ISREG(st.st_mode):
                self._entry(name, stat.S_IFREG | perms, path.read_bytes())
            else:
                raise GuestBuildError(f"unsupported file type in initramfs tree: {path}")

    def add_char_device(self, name: str, perms: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perms, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        data = b"".join(self._chunks)
        return data + b"\0" * ((512 - len(data) % 512) % 512)


def _make_initramfs(tree: Path, output: Path) -> None:
    writer = _CpioWriter()
    writer.add_tree(tree)
    # The kernel opens /dev/console before running /init, before devtmpfs is up.
    writer.add_char_device("dev/console", 0o600, 5, 1)
    writer.add_char_device("dev/null", 0o666, 1, 3)
    output.write_bytes(gzip.compress(writer.finish(), compresslevel=9, mtime=0))


# ------------------------------------------------------------------------ disk


def _boot_files(kernel: Path, initrd: Path) -> dict[str, Path | str]:
    files: dict[str, Path | str] = {KERNEL_NAME: kernel, INITRD_NAME: initrd}
    for name, relpath in BOOT_FILES.items():
        files[relpath] = _read_file(name).replace("@CMDLINE@", KERNEL_CMDLINE)
    efi = _first_existing(
        SYSTEMD_BOOT_EFI_CANDIDATES, "systemd-boot EFI binary", "systemd-boot-efi"
    )
    files["EFI/BOOT/BOOTX64.EFI"] = efi
    return files


def _make_boot_fs(image: Path, size_bytes: int, files: dict[str, Path | str], work: Path) -> None:
    with image.open("wb") as f:
        f.truncate(size_bytes)
    _run(
        [
            "mkfs.vfat",
            "-F",
            "16",
            "-n",
            BOOT_LABEL,
            "-h",
            str(BOOT_PART_START_SECTOR),
            "-D",
            "0x80",
            "-M",
            "0xF8",
            "--invariant",
            image,
        ]
    )
    # BIOS: ldlinux.sys/ldlinux.c32 + boot sector (needs the hidden sectors above)
    _run(["syslinux", "--install", image])
    staging = work / "bootfs"
    dirs: set[str] = set()
    for relpath, content in sorted(files.items()):
        parent = relpath.rpartition("/")[0]
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
        local = staging / relpath
        local.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, local)
        else:
            local.write_text(content)
    for d in sorted(dirs, key=lambda p: p.count("/")):
        _run(["mmd", "-i", image, f"::/{d}"])
    for relpath in sorted(files):
        _run(["mcopy", "-o", "-i", image, staging / relpath, f"::/{relpath}"])


def _make_root_fs(image: Path, size_bytes: int, tree: Path) -> None:
    with image.open("wb") as f:
        f.truncate(size_bytes)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-m",
            "0",
            "-E",
            "root_owner=0:0",
            "-d",
            tree,
            image,
        ]
    )


def _copy_sparse(src: Path, dst_file: Path, offset: int) -> None:
    chunk = MIB
    zero = bytes(chunk)
    with src.open("rb") as fin, dst_file.open("r+b") as fout:
        pos = offset
        while True:
            data = fin.read(chunk)
            if not data:
                break
            if data != zero[: len(data)]:
                fout.seek(pos)
                fout.write(data)
            pos += len(data)


def _make_disk(raw: Path, boot_fs: Path, root_fs: Path) -> None:
    boot_sectors = boot_fs.stat().st_size // SECTOR
    root_start = BOOT_PART_START_SECTOR + boot_sectors
    root_sectors = root_fs.stat().st_size // SECTOR
    total = (root_start + root_sectors) * SECTOR
    with raw.open("wb") as f:
        f.truncate(total)
    table = (
        "label: dos\n"
        "label-id: 0x7a1e0001\n"
        "unit: sectors\n"
        "\n"
        f"start={BOOT_PART_START_SECTOR}, size={boot_sectors}, type=ef, bootable\n"
        f"start={root_start}, size={root_sectors}, type=83\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", raw], input_bytes=table.encode())
    mbr = _first_existing(SYSLINUX_MBR_CANDIDATES, "syslinux mbr.bin", "syslinux-common")
    code = mbr.read_bytes()
    if len(code) > 440:
        raise GuestBuildError(f"{mbr} is larger than the 440-byte MBR boot code area")
    with raw.open("r+b") as f:
        f.write(code)
    _copy_sparse(boot_fs, raw, BOOT_PART_START_SECTOR * SECTOR)
    _copy_sparse(root_fs, raw, root_start * SECTOR)


# ------------------------------------------------------------------------- cache


def _inputs_digest() -> str:
    """Hash of the builder source and the guest files directory."""
    h = hashlib.sha256()
    h.update(b"tiny.py\0")
    h.update(Path(__file__).read_bytes())
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


def _read_stamp(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _outputs_present(dest: Path) -> bool:
    return all((dest / n).is_file() for n in (IMAGE_NAME, KERNEL_NAME, INITRD_NAME))


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    with (dest / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_fresh(dest: Path, build_id: str) -> bool:
    stamp = _read_stamp(dest)
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
        stamp = _read_stamp(dest)
        if stamp is not None and stamp.get("inputs") == inputs and _outputs_present(dest):
            log.warning("cannot check the package versions, reusing %s: %s", image, exc)
            return image
        raise
    build_id = _build_id(inputs, packages)
    if _is_fresh(dest, build_id):
        return image
    with _locked(dest):
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
    version, vmlinuz, index = _prepare_kernel(kernel_root)
    log.info("kernel %s (%s %s)", version, packages.kernel, packages.kernel_version)

    initramfs_tree = work / "initramfs"
    _make_initramfs_tree(initramfs_tree, busybox, index, version)
    initrd = work / INITRD_NAME
    _make_initramfs(initramfs_tree, initrd)

    root_tree = work / "root"
    _make_root_tree(root_tree, busybox, index, version, build_id)

    files = _boot_files(vmlinuz, initrd)
    payload = sum(p.stat().st_size for p in files.values() if isinstance(p, Path))
    boot_mib = max(MIN_BOOT_PART_MIB, -(-(payload * 3 // 2 + 4 * MIB) // MIB))
    boot_fs = work / "boot.vfat"
    _make_boot_fs(boot_fs, boot_mib * MIB, files, work)

    root_mib = DISK_SIZE_MIB - boot_mib - BOOT_PART_START_SECTOR * SECTOR // MIB
    if root_mib < 64:
        raise GuestBuildError(f"no room for the root filesystem ({root_mib} MiB)")
    root_fs = work / "root.ext4"
    _make_root_fs(root_fs, root_mib * MIB, root_tree)

    raw = work / "disk.raw"
    _make_disk(raw, boot_fs, root_fs)

    stage = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=dest))
    try:
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, stage / IMAGE_NAME])
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
    parser = argparse.ArgumentParser(
        prog="python -m vmhive.guest.tiny", description="Build the tiny vmhive test guest image."
    )
    parser.add_argument("dest", type=Path, help="destination directory")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep intermediates here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        image = build_tiny_image(args.dest, args.work_dir)
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
