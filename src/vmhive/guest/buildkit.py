"""Tools shared by the guest image builders (the tiny and Debian images, the installer ISO).

A command runner with clear errors, a newc cpio writer for initramfs images,
the kernel-module index that copies a module set with its dependencies, and
the assembly of a disk that boots under both SeaBIOS and UEFI without loop
devices (:func:`make_boot_disk`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import gzip
import json
import logging
import lzma
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("vmhive.guest")


class GuestBuildError(RuntimeError):
    """Building the tiny guest image failed."""


def run_command(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    timeout: float = 600,
    error: type[GuestBuildError] | None = None,
) -> str:
    """Run a command, return its stdout; raise `error` (GuestBuildError) on any failure."""
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
            f"command not found: {argv[0]} (scripts/install-deps.sh installs what the "
            "image builders need)"
        ) from exc
    stdout = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise fail(
            f"command failed with exit code {proc.returncode}: {' '.join(argv)}\n"
            f"{stderr or stdout.strip()}"
        )
    return stdout


def first_existing(
    candidates: Iterable[Path],
    what: str,
    package: str,
    error: type[GuestBuildError] | None = None,
) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise (error or GuestBuildError)(f"{what} not found (install the Debian package {package})")


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
class ModuleIndex:
    """The kernel package's module metadata (modules.dep, .alias, .softdep, .builtin)."""

    moddir: Path
    deps: dict[str, list[str]] = field(default_factory=dict)  # relpath -> relpaths
    by_name: dict[str, str] = field(default_factory=dict)  # name -> relpath
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (pattern, name)
    softdeps: dict[str, list[str]] = field(default_factory=dict)  # name -> names
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
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


def find_moddir(kernel_root: Path) -> tuple[str, Path]:
    for base in (kernel_root / "lib" / "modules", kernel_root / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p for p in base.iterdir() if p.is_dir())
            if len(versions) == 1:
                return versions[0].name, versions[0]
            if versions:
                raise GuestBuildError(f"several kernel versions in {base}: {versions}")
    raise GuestBuildError(f"no lib/modules/<version> directory in {kernel_root}")


def prepare_kernel(kernel_root: Path) -> tuple[str, Path, ModuleIndex]:
    """Return (kernel version, vmlinuz path, module index) of an unpacked kernel package."""
    version, moddir = find_moddir(kernel_root)
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
        run_command(["depmod", "-b", kernel_root, version])
    return version, vmlinuz, ModuleIndex.load(moddir)


def install_modules(
    index: ModuleIndex, version: str, modules: Sequence[tuple[str, bool]], root: Path
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
            run_command(["zstd", "-q", "-d", "-f", "-o", dst, src])
        else:
            shutil.copyfile(src, dst)
        dst.chmod(0o644)
    run_command(["depmod", "-b", root, version])
    if not (target / "modules.dep").is_file():
        raise GuestBuildError(f"depmod produced no modules.dep in {target}")


def module_list(modules: Iterable[tuple[str, bool]]) -> str:
    """Load list for the guest scripts: one module a line, 'optional' if it may fail."""
    return "".join(f"{_module_name(r)}{'' if req else ' optional'}\n" for r, req in modules)


class CpioWriter:
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


# ------------------------------------------------------------------ boot disks

SECTOR = 512
MIB = 1024 * 1024
#: First sector of the boot partition (1 MiB alignment).
BOOT_PART_START_SECTOR = 2048

#: Names of the kernel and initramfs on the FAT boot partition (the bootloader
#: configurations refer to them as /vmlinuz and /initrd.img).
BOOT_KERNEL_NAME = "vmlinuz"
BOOT_INITRD_NAME = "initrd.img"

SYSTEMD_BOOT_EFI_CANDIDATES = (
    Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
    Path("/lib/systemd/boot/efi/systemd-bootx64.efi"),
)
SYSLINUX_MBR_CANDIDATES = (
    Path("/usr/lib/syslinux/mbr/mbr.bin"),
    Path("/usr/lib/SYSLINUX/mbr.bin"),
)


@dataclass(frozen=True)
class DiskLayout:
    """Size and labels of a disk made by :func:`make_boot_disk`."""

    disk_mib: int
    boot_label: str
    root_label: str
    min_boot_mib: int = 32
    min_root_mib: int = 64
    #: ext4 blocks reserved for root, in percent (mkfs.ext4 -m).
    root_reserved_percent: int = 0


def boot_partition_files(
    kernel: Path, initrd: Path, configs: Mapping[str, str]
) -> dict[str, Path | str]:
    """Files of the FAT boot partition: kernel, initramfs, bootloader *configs* and systemd-boot.

    *configs* maps paths on the partition (``syslinux.cfg``, ``loader/...``) to
    their text. systemd-boot is installed as the UEFI removable-media loader
    (``EFI/BOOT/BOOTX64.EFI``) so that no NVRAM boot entry is needed.
    """
    files: dict[str, Path | str] = {BOOT_KERNEL_NAME: kernel, BOOT_INITRD_NAME: initrd}
    files.update(configs)
    efi = first_existing(SYSTEMD_BOOT_EFI_CANDIDATES, "systemd-boot EFI binary", "systemd-boot-efi")
    files["EFI/BOOT/BOOTX64.EFI"] = efi
    return files


def make_boot_disk(
    raw: Path, boot_files: Mapping[str, Path | str], root_tree: Path, work: Path, layout: DiskLayout
) -> None:
    """Write an MBR disk image *raw* of ``layout.disk_mib`` MiB that boots by BIOS and UEFI.

    Partition 1 (active, type 0xEF, FAT16) holds syslinux (BIOS, with syslinux's
    MBR code) and *boot_files*; partition 2 (type 0x83, ext4), the last one so
    that it can grow with the disk, is made from *root_tree* with ``mkfs.ext4 -d``.
    No loop devices or mounts: both filesystems are built in files and copied
    into place. *work* holds the intermediate files.
    """
    payload = sum(p.stat().st_size for p in boot_files.values() if isinstance(p, Path))
    boot_mib = max(layout.min_boot_mib, -(-(payload * 3 // 2 + 4 * MIB) // MIB))
    boot_fs = work / "boot.vfat"
    _make_boot_fs(boot_fs, boot_mib * MIB, boot_files, work, layout.boot_label)

    root_mib = layout.disk_mib - boot_mib - BOOT_PART_START_SECTOR * SECTOR // MIB
    if root_mib < layout.min_root_mib:
        raise GuestBuildError(f"no room for the root filesystem ({root_mib} MiB)")
    root_fs = work / "root.ext4"
    _make_root_fs(
        root_fs, root_mib * MIB, root_tree, layout.root_label, layout.root_reserved_percent
    )
    _make_disk(raw, boot_fs, root_fs)


def _make_boot_fs(
    image: Path, size_bytes: int, files: Mapping[str, Path | str], work: Path, label: str
) -> None:
    with image.open("wb") as f:
        f.truncate(size_bytes)
    run_command(
        [
            "mkfs.vfat",
            "-F",
            "16",
            "-n",
            label,
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
    run_command(["syslinux", "--install", image])
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
        run_command(["mmd", "-i", image, f"::/{d}"])
    for relpath in sorted(files):
        run_command(["mcopy", "-o", "-i", image, staging / relpath, f"::/{relpath}"])


def _make_root_fs(
    image: Path, size_bytes: int, tree: Path, label: str, reserved_percent: int
) -> None:
    with image.open("wb") as f:
        f.truncate(size_bytes)
    run_command(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-m",
            str(reserved_percent),
            "-E",
            "root_owner=0:0",
            "-d",
            tree,
            image,
        ],
        timeout=1800,
    )


def _copy_sparse(src: Path, dst_file: Path, offset: int) -> None:
    """Copy *src* into the existing file *dst_file* at *offset*, skipping zero MiBs."""
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
    run_command(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", raw], input_bytes=table.encode()
    )
    mbr = first_existing(SYSLINUX_MBR_CANDIDATES, "syslinux mbr.bin", "syslinux-common")
    code = mbr.read_bytes()
    if len(code) > 440:
        raise GuestBuildError(f"{mbr} is larger than the 440-byte MBR boot code area")
    with raw.open("r+b") as f:
        f.write(code)
    _copy_sparse(boot_fs, raw, BOOT_PART_START_SECTOR * SECTOR)
    _copy_sparse(root_fs, raw, root_start * SECTOR)


# ------------------------------------------------------------- cache stamps


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file`: one builder at a time per destination."""
    with lock_file.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_stamp(stamp_file: Path) -> dict[str, object] | None:
    """A build's stamp (JSON object); None when missing or unreadable."""
    try:
        data = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -------------------------------------------------------------------------- CLI


def builder_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    build: Callable[[argparse.Namespace], Path],
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line of an image builder: ``python -m PROG DEST``; prints the result.

    `build` gets the parsed arguments (``dest``, ``work_dir``, and whatever
    `extra_args` added) and returns the path of what it built.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("dest", type=Path, help="destination directory")
    if extra_args is not None:
        extra_args(parser)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep intermediates here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        result = build(args)
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0
