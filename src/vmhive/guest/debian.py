"""Builder for the vmhive Debian 12 (bookworm) guest image.

The image is built offline, without booting a VM: ``debootstrap`` installs a
minimal Debian (``--variant=minbase``, no recommended packages) with the
packages in :data:`PACKAGES` into a directory, the directory becomes an ext4
filesystem (``mkfs.ext4 -d``) and the disk is assembled like the tiny image's
(:func:`vmhive.guest.buildkit.make_boot_disk`): no loop devices.

Result, in the destination directory:

* ``debian.qcow2`` (:data:`IMAGE_NAME`, zstd-compressed clusters): a 2 GiB
  MBR disk that boots under SeaBIOS (syslinux) and UEFI (systemd-boot as
  ``EFI/BOOT/BOOTX64.EFI``):

  - partition 1 (active, type 0xEF, FAT16, label ``DEBIAN-BOOT``): the
    bootloaders, ``vmlinuz`` and ``initrd.img``, mounted on ``/boot/efi``
    on demand; a kernel/initramfs hook copies new kernels there;
  - partition 2 (type 0x83, ext4, label ``debian-root``): the root
    filesystem, last on the disk so that cloud-init's growpart grows it to
    the size of the VM's disk.

* ``debian.stamp``: JSON stamp with the build id (hash of this builder and its
  data files) and the installed package versions; the build is skipped when
  the build id matches.
* ``debian-build.log``: the output of the last build's commands.

The guest: serial console and getty on ttyS0, cloud-init with the NoCloud
datasource (DHCP on the first NIC through ifupdown when the seed has no network
config), OpenSSH (host keys made per instance by cloud-init), qemu-guest-agent,
an empty machine-id (each VM makes its own), apt sources on deb.debian.org
(bookworm, -updates, -security) with empty package lists, no documentation or
translations and no kernel modules for hardware a VM lacks
(``debian_files/dpkg-minimal.cfg``). Root's password is locked: log in as the
cloud-init user (``debian`` by default, or the seed's ``users``).

Usage: ``build_debian_image(dest)`` or ``python -m vmhive.guest.debian DEST_DIR``.
The build runs as root, needs the host packages in :data:`BUILD_PACKAGES`, and
a Debian mirror: ``$VMHIVE_DEBIAN_MIRROR``, else the host's apt mirror for
bookworm, else :data:`DEFAULT_MIRROR`. It works in a temporary directory
(``$TMPDIR``, about 2 GiB) and never writes outside it and *dest*.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from vmhive.guest import buildkit
from vmhive.guest.buildkit import (
    MIB,
    DiskLayout,
    GuestBuildError,
    boot_partition_files,
    builder_main,
    locked,
    make_boot_disk,
    read_stamp,
)

#: Debian packages the build needs on the host (besides Python).
BUILD_PACKAGES: tuple[str, ...] = (
    "debootstrap",
    "debian-archive-keyring",  # debootstrap checks the mirror's signatures
    "util-linux",  # unshare, mount, umount
    "coreutils",  # chroot
    "e2fsprogs",  # mkfs.ext4 -d
    "dosfstools",  # mkfs.vfat
    "mtools",  # mcopy, mmd
    "syslinux",  # BIOS boot on FAT
    "syslinux-common",  # mbr.bin
    "systemd-boot-efi",  # UEFI boot
    "fdisk",  # sfdisk
    "qemu-utils",  # qemu-img convert
)

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "VMHIVE_DEBIAN_MIRROR"
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")

#: Installed on top of debootstrap's minbase variant (which brings apt, dpkg,
#: coreutils, util-linux and the like), without recommended packages.
PACKAGES: tuple[str, ...] = (
    # linux-image-cloud-amd64 has no driver for e1000 (gen 1's NIC) nor AHCI:
    # the generic kernel, without the modules dpkg-minimal.cfg excludes.
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",  # initramfs compression
    "systemd-sysv",
    "udev",
    "dbus",  # logind (ACPI power button), hostnamectl
    "libpam-systemd",
    "e2fsprogs",
    "cloud-init",
    # debootstrap resolves no virtual packages: python3-cryptography needs
    # python3-cffi-backend-api-min/max, which this provides.
    "python3-cffi-backend",
    "cloud-guest-utils",  # growpart
    "ifupdown",  # cloud-init's network renderer on Debian
    "isc-dhcp-client",
    "netbase",
    "openssh-server",
    "qemu-guest-agent",
    "sudo",
    "procps",
)

IMAGE_NAME = "debian.qcow2"
STAMP_NAME = "debian.stamp"
LOG_NAME = "debian-build.log"
LOCK_NAME = ".debian.lock"

ROOT_LABEL = "debian-root"
BOOT_LABEL = "DEBIAN-BOOT"
#: Kernel command line used by both on-disk bootloaders.
KERNEL_CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=tty0 console=ttyS0,115200"

DISK_SIZE_MIB = 2048
DISK_LAYOUT = DiskLayout(
    disk_mib=DISK_SIZE_MIB,
    boot_label=BOOT_LABEL,
    root_label=ROOT_LABEL,
    # room for a second kernel and initramfs while the boot hook replaces them
    min_boot_mib=64,
    min_root_mib=1024,
    root_reserved_percent=5,
)

DEBOOTSTRAP_TIMEOUT = 1800.0
FILES_DIR = Path(__file__).resolve().parent / "debian_files"

# debian_files/<name> -> (path in the target, mode), written before debootstrap's
# second stage, which installs the packages and builds the initramfs.
PRESEED_FILES: dict[str, tuple[str, int]] = {
    "dpkg-minimal.cfg": ("etc/dpkg/dpkg.cfg.d/vmhive-minimal", 0o644),
    "initramfs.conf": ("etc/initramfs-tools/conf.d/vmhive.conf", 0o644),
    "initramfs-modules": ("usr/share/initramfs-tools/modules.d/vmhive-guest", 0o644),
}
# Only for the build, removed from the image.
BUILD_ONLY_FILES: dict[str, tuple[str, int]] = {
    "dpkg-build.cfg": ("etc/dpkg/dpkg.cfg.d/vmhive-build", 0o644),
    "policy-rc.d": ("usr/sbin/policy-rc.d", 0o755),
}
# Written after the second stage; @ROOT_LABEL@ and @BOOT_LABEL@ are substituted.
CONFIG_FILES: dict[str, tuple[str, int]] = {
    "fstab": ("etc/fstab", 0o644),
    "hostname": ("etc/hostname", 0o644),
    "hosts": ("etc/hosts", 0o644),
    "locale": ("etc/default/locale", 0o644),
    "debian.sources": ("etc/apt/sources.list.d/debian.sources", 0o644),
    "cloud.cfg": ("etc/cloud/cloud.cfg.d/90_vmhive.cfg", 0o644),
    "ssh-host-keys.conf": ("etc/systemd/system/ssh.service.d/vmhive-host-keys.conf", 0o644),
    "boot-partition-hook": ("etc/initramfs/post-update.d/vmhive-boot-partition", 0o755),
}
# path in the target -> symlink target
SYMLINKS: dict[str, str] = {
    "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service": (
        "/lib/systemd/system/serial-getty@.service"
    ),
    # ConditionFirstBoot holds with an empty machine-id: it would prompt on the console.
    "etc/systemd/system/systemd-firstboot.service": "/dev/null",
    "etc/kernel/postrm.d/zz-vmhive-boot-partition": (
        "/etc/initramfs/post-update.d/vmhive-boot-partition"
    ),
}
# debian_files/<name> -> path on the FAT boot partition; @CMDLINE@ is substituted
BOOT_FILES: dict[str, str] = {
    "syslinux.cfg": "syslinux.cfg",
    "loader.conf": "loader/loader.conf",
    "loader-entry.conf": "loader/entries/debian.conf",
}
# Files and directory contents removed from the image (globs, relative to the target).
REMOVE_GLOBS: tuple[str, ...] = (
    "etc/apt/sources.list",  # debootstrap's, with the build mirror
    "etc/ssh/ssh_host_*",  # made per instance
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/lib/apt/lists/*_*",
    "var/log/*.log",
    "var/log/apt/*.log",
    "dev/*",  # debootstrap's device nodes; the guest mounts devtmpfs
    "tmp/*",
)

# Clean environment for commands in the target: nothing of the host's leaks in.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

log = logging.getLogger(__name__)


class DebianBuildError(GuestBuildError):
    """Building the Debian image failed; the message is one line."""


# --------------------------------------------------------------------------- paths


def debian_image_path(dest: Path) -> Path:
    """Path of the qcow2 disk image inside *dest* (whether or not it is built)."""
    return Path(dest) / IMAGE_NAME


# -------------------------------------------------------------------------- mirror


def host_mirror(
    suite: str = SUITE,
    sources_dir: Path = APT_SOURCES_DIR,
    sources_list: Path = APT_SOURCES_LIST,
) -> str | None:
    """The first http(s) mirror of the host's apt sources that carries *suite*'s main.

    Reads deb822 ``*.sources`` files, then the one-line format of ``*.list``
    files and ``sources.list``. Returns None if no source qualifies.
    """
    candidates: list[Path] = sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []
    for path in candidates:
        with contextlib.suppress(OSError):
            for fields in _deb822_stanzas(path.read_text()):
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                ):
                    for uri in fields.get("uris", "").split():
                        if _usable_mirror(uri):
                            return uri.rstrip("/")
    lists = [sources_list, *(sorted(sources_dir.glob("*.list")) if sources_dir.is_dir() else [])]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if (
                    len(words) >= 4
                    and words[0] == "deb"
                    and words[2] == suite
                    and "main" in words[3:]
                    and _usable_mirror(words[1])
                ):
                    return words[1].rstrip("/")
    return None


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, ""
        elif line[0].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()


def _usable_mirror(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def select_mirror() -> str:
    """``$VMHIVE_DEBIAN_MIRROR``, else the host's bookworm mirror, else deb.debian.org."""
    return os.environ.get(MIRROR_ENV) or host_mirror() or DEFAULT_MIRROR


# ---------------------------------------------------------------------- commands


def _run(
    args: Sequence[str | os.PathLike[str]],
    log_path: Path,
    *,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> None:
    """Run a command, appending its output to *log_path*; DebianBuildError on failure.

    The command runs in a process group of its own, killed whole on timeout
    (debootstrap leaves dpkg and wget children behind otherwise).
    """
    argv = [os.fspath(a) for a in args]
    what = what or Path(argv[0]).name
    log.debug("running %s", argv)
    with log_path.open("ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else dict(os.environ, LC_ALL="C"),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise DebianBuildError(
                f"command not found: {argv[0]} (install the Debian packages in "
                "vmhive.guest.debian.BUILD_PACKAGES)"
            ) from exc
        try:
            returncode = proc.wait(timeout=timeout)
        except BaseException as exc:  # timeout, or KeyboardInterrupt
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise DebianBuildError(
                    f"{what} timed out after {timeout:.0f}s (log: {log_path})"
                ) from None
            raise
    if returncode != 0:
        raise DebianBuildError(
            f"{what} failed with exit code {returncode}: {_last_error(log_path)} (log: {log_path})"
        )


def _last_error(log_path: Path) -> str:
    """The most telling line of the log's tail: the last "E:" line, else the last line."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [ln for ln in lines if ln and not ln.startswith("$ ")]
    errors = [ln for ln in lines if ln.startswith("E:")]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]}: {lines[-1]}"


# ---------------------------------------------------- mounts and target processes


def _mounts_below(path: Path) -> list[Path]:
    """Mount points at or below *path* (a resolved path), deepest first."""
    prefix = str(path).rstrip("/") + "/"
    points: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # mountinfo escapes blanks and backslashes as octal (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == str(path) or point.startswith(prefix):
            points.append(Path(point))
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def _unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below *path*; DebianBuildError if anything stays."""
    for point in _mounts_below(path):
        log.warning("unmounting %s, left mounted in the build tree", point)
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            # busy: detach it, so that nothing below path reaches into it any more
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    left = _mounts_below(path)
    if left:
        raise DebianBuildError(f"cannot unmount {left[0]}: unmount it by hand")


def _kill_processes_in(root: Path) -> None:
    """Kill processes left running with *root* as their root directory (started by the build)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") != str(root):
                continue
            log.warning("killing process %s left running in %s", entry.name, root)
            os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@contextlib.contextmanager
def _chroot_guard(root: Path) -> Iterator[None]:
    """Around commands run in *root*: afterwards, whatever happened, nothing runs in it
    and nothing is mounted below it."""
    try:
        yield
    finally:
        _kill_processes_in(root)
        _unmount_below(root)


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount point (a bind mount would reach into the host)."""
    _unmount_below(path)
    shutil.rmtree(path)


# -------------------------------------------------------- writing into the target


def _target_dir(root: Path, reldir: str) -> Path:
    """ROOT/reldir, created as needed, refusing anything that leads out of *root*.

    Symlinks inside the target are resolved on the host: an absolute one
    (``/var/run -> /run``) would lead into the host's filesystem.
    """
    current = root
    for part in PurePosixPath(reldir).parts:
        if part in ("/", ".", ".."):
            raise DebianBuildError(f"invalid path in the target: {reldir!r}")
        step = current / part
        if step.is_symlink():
            step = step.resolve()
            if not step.is_relative_to(root):
                raise DebianBuildError(f"{current / part} leads out of the target tree")
        elif not step.exists():
            step.mkdir(mode=0o755)
        if not step.is_dir():
            raise DebianBuildError(f"{step} is not a directory")
        current = step
    return current


def _target_path(root: Path, relpath: str) -> Path:
    """ROOT/relpath with its directory checked by :func:`_target_dir`; the last
    component is never followed (callers replace it)."""
    rel = PurePosixPath(relpath)
    if rel.name in ("", ".", ".."):
        raise DebianBuildError(f"invalid path in the target: {relpath!r}")
    return _target_dir(root, str(rel.parent)) / rel.name


def _unlink(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _write(root: Path, relpath: str, content: str, mode: int) -> None:
    path = _target_path(root, relpath)
    _unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    os.fchmod(fd, mode)  # exactly, whatever the umask
    with os.fdopen(fd, "w") as f:
        f.write(content)


def _symlink(root: Path, relpath: str, link_target: str) -> None:
    path = _target_path(root, relpath)
    _unlink(path)
    path.symlink_to(link_target)


def _remove_glob(root: Path, pattern: str) -> None:
    rel = PurePosixPath(pattern)
    directory = root / rel.parent
    if directory.is_symlink() or not directory.is_dir():
        return
    directory = _target_dir(root, str(rel.parent))
    for path in directory.glob(rel.name):
        _unlink(path)


def _read_file(name: str) -> str:
    path = FILES_DIR / name
    try:
        return path.read_text()
    except OSError as exc:
        raise DebianBuildError(f"guest file {path} missing: {exc}") from exc


def _install_files(root: Path, files: Mapping[str, tuple[str, int]]) -> None:
    for name, (relpath, mode) in files.items():
        text = _read_file(name)
        text = text.replace("@ROOT_LABEL@", ROOT_LABEL).replace("@BOOT_LABEL@", BOOT_LABEL)
        _write(root, relpath, text, mode)


def _dpkg_filters(text: str) -> list[tuple[bool, str]]:
    """(exclude?, glob) rules of a dpkg.cfg path-exclude/path-include file."""
    rules = []
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key in ("path-exclude", "path-include") and value:
            rules.append((key == "path-exclude", value))
    return rules


def _prune(root: Path, rules: Sequence[tuple[bool, str]]) -> int:
    """Delete the files below /usr/share that *rules* exclude, as dpkg would have.

    debootstrap's first stage unpacks the base packages without dpkg, so
    their documentation escapes the filters. Returns the number of files removed.
    """
    removed = 0
    share = root / "usr" / "share"
    if share.is_symlink():
        raise DebianBuildError(f"{share} is a symlink")
    for dirpath, dirnames, filenames in os.walk(share):
        for name in [
            *filenames,
            *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))),
        ]:
            path = os.path.join(dirpath, name)
            guest_path = "/" + os.path.relpath(path, root)
            excluded = False
            for exclude, pattern in rules:
                if fnmatch.fnmatchcase(guest_path, pattern):
                    excluded = exclude
            if excluded:
                os.unlink(path)
                removed += 1
    return removed


# ----------------------------------------------------------------------- build


def _inputs_digest() -> str:
    """Build id: hash of this builder, buildkit, the data files, suite and packages."""
    h = hashlib.sha256(f"{SUITE}\0{','.join(PACKAGES)}".encode())
    for source in (Path(__file__), Path(buildkit.__file__)):
        h.update(b"\0source\0" + source.name.encode() + b"\0" + source.read_bytes())
    if not FILES_DIR.is_dir():
        raise DebianBuildError(f"guest files directory {FILES_DIR} missing")
    for path in sorted(p for p in FILES_DIR.iterdir() if p.is_file()):
        h.update(b"\0file\0" + path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _is_fresh(dest: Path, build_id: str) -> bool:
    stamp = read_stamp(dest / STAMP_NAME)
    return (
        stamp is not None
        and stamp.get("build_id") == build_id
        and debian_image_path(dest).is_file()
    )


def build_debian_image(dest: Path, work_dir: Path | None = None) -> Path:
    """Build (or reuse) the Debian image in *dest*; return the path of debian.qcow2.

    Returns at once when ``dest/debian.qcow2`` exists with a stamp matching the
    build id (this module, buildkit and the ``debian_files`` directory).
    Otherwise, holding a lock on *dest*, builds in a temporary directory (inside
    *work_dir* if given, which then keeps the intermediate files) and renames
    the image, then the stamp, into *dest*. Raises :class:`DebianBuildError`
    on failure, leaving *dest* as it was (but for ``debian-build.log``).
    """
    dest = Path(dest).resolve()
    image = debian_image_path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        build_id = _inputs_digest()
        if _is_fresh(dest, build_id):
            return image
        with locked(dest / LOCK_NAME):
            if _is_fresh(dest, build_id):  # built meanwhile by another process
                return image
            if os.geteuid() != 0:
                raise DebianBuildError("building the Debian image needs root (debootstrap, chroot)")
            if work_dir is not None:
                work_dir = Path(work_dir).resolve()
                work_dir.mkdir(parents=True, exist_ok=True)
                _build(dest, Path(tempfile.mkdtemp(prefix="debian-", dir=work_dir)), build_id)
            else:
                work = Path(tempfile.mkdtemp(prefix="vmhive-debian-")).resolve()
                try:
                    _build(dest, work, build_id)
                finally:
                    _remove_tree(work)
    except DebianBuildError:
        raise
    except (GuestBuildError, OSError) as exc:
        raise DebianBuildError(f"building the Debian image failed: {_one_line(exc)}") from exc
    return image


def _build(dest: Path, work: Path, build_id: str) -> None:
    build_log = dest / LOG_NAME
    build_log.write_text(f"vmhive Debian image build {build_id}\n")
    mirror = select_mirror()
    log.info(
        "building the Debian %s image in %s (mirror %s, work dir %s)", SUITE, dest, mirror, work
    )
    target = work / "root"
    target.mkdir()
    _debootstrap(target, mirror, build_log)
    _configure(target, build_id)
    release, kernel, initrd = _kernel(target)
    packages = _installed_packages(target)

    raw = work / "disk.raw"
    configs = {
        relpath: _read_file(name).replace("@CMDLINE@", KERNEL_CMDLINE)
        for name, relpath in BOOT_FILES.items()
    }
    log.info("assembling the disk (kernel %s)", release)
    make_boot_disk(raw, boot_partition_files(kernel, initrd, configs), target, work, DISK_LAYOUT)

    stage = Path(tempfile.mkdtemp(prefix=".debian-build-", dir=dest))
    try:
        _run(
            # compressed clusters: a third of the size, read back at no noticeable cost
            [
                "qemu-img",
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                raw,
                stage / IMAGE_NAME,
            ],
            build_log,
            timeout=1800,
        )
        (stage / IMAGE_NAME).chmod(0o644)
        stamp = {
            "build_id": build_id,
            "suite": SUITE,
            "mirror": mirror,
            "kernel_release": release,
            "cmdline": KERNEL_CMDLINE,
            "root_label": ROOT_LABEL,
            "packages": packages,
        }
        (stage / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        # Invalidate first, publish the image, then the stamp last.
        (dest / STAMP_NAME).unlink(missing_ok=True)
        os.replace(stage / IMAGE_NAME, dest / IMAGE_NAME)
        os.replace(stage / STAMP_NAME, dest / STAMP_NAME)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = (dest / IMAGE_NAME).stat().st_size
    log.info("built %s (%.1f MiB)", dest / IMAGE_NAME, size / MIB)


def _debootstrap(target: Path, mirror: str, build_log: Path) -> None:
    """Both debootstrap stages, with vmhive's dpkg and initramfs settings in between."""
    log.info("debootstrap, first stage (download and unpack)")
    _run(
        [
            "debootstrap",
            "--foreign",
            "--arch=amd64",
            "--variant=minbase",
            "--components=main",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            target,
            mirror,
        ],
        build_log,
        timeout=DEBOOTSTRAP_TIMEOUT,
    )
    _install_files(target, PRESEED_FILES)
    _install_files(target, BUILD_ONLY_FILES)
    log.info("debootstrap, second stage (install and configure)")
    # In a mount namespace of its own: the /proc and /sys debootstrap mounts in
    # the target vanish with it, even if it is killed.
    with _chroot_guard(target):
        try:
            _run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "chroot",
                    target,
                    "/debootstrap/debootstrap",
                    "--second-stage",
                ],
                build_log,
                timeout=DEBOOTSTRAP_TIMEOUT,
                env=CHROOT_ENV,
                what="debootstrap --second-stage",
            )
        except DebianBuildError:
            details = target / "debootstrap" / "debootstrap.log"
            if details.is_file() and not details.is_symlink():
                with build_log.open("ab") as out:
                    out.write(b"\n--- debootstrap.log of the second stage:\n")
                    out.write(details.read_bytes()[-65536:])
            raise


def _configure(target: Path, build_id: str) -> None:
    """vmhive's configuration of the installed system, and its cleanup."""
    _unmount_below(target)  # nothing may be mounted while files are removed
    for _name, (relpath, _mode) in BUILD_ONLY_FILES.items():
        _unlink(_target_path(target, relpath))
    _install_files(target, CONFIG_FILES)
    for relpath, link_target in SYMLINKS.items():
        _symlink(target, relpath, link_target)
    _target_dir(target, "boot/efi")
    _write(target, "etc/vmhive/image", f"debian {SUITE} {build_id}\n", 0o644)
    _write(target, "etc/resolv.conf", "", 0o644)  # debootstrap copied the host's
    # Empty: systemd makes a machine-id at each VM's first boot.
    _write(target, "etc/machine-id", "", 0o444)
    dbus_id = target / "var" / "lib" / "dbus" / "machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():  # a link to /etc/machine-id stays
        _unlink(_target_path(target, "var/lib/dbus/machine-id"))
    for pattern in REMOVE_GLOBS:
        _remove_glob(target, pattern)
    removed = _prune(target, _dpkg_filters(_read_file("dpkg-minimal.cfg")))
    log.debug("removed %d documentation files", removed)


def _kernel(target: Path) -> tuple[str, Path, Path]:
    """(release, vmlinuz, initrd) installed in the target."""
    boot = target / "boot"
    kernels = sorted(p for p in boot.glob("vmlinuz-*") if not p.is_symlink() and p.is_file())
    if len(kernels) != 1:
        raise DebianBuildError(f"expected one kernel in {boot}, found {len(kernels)}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{release}"
    if initrd.is_symlink() or not initrd.is_file():
        raise DebianBuildError(f"no initramfs {initrd} (update-initramfs failed?)")
    return release, kernels[0], initrd


def _installed_packages(target: Path) -> dict[str, str]:
    """Package -> version, from the target's dpkg database (read by the host's dpkg-query)."""
    admindir = target / "var" / "lib" / "dpkg"
    try:
        proc = subprocess.run(
            ["dpkg-query", f"--admindir={admindir}", "-W", "-f", "${Package} ${Version}\\n"],
            capture_output=True,
            check=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise DebianBuildError(f"cannot list the packages of the target: {exc}") from exc
    lines = proc.stdout.decode(errors="replace").splitlines()
    packages = dict(line.split(" ", 1) for line in lines if " " in line)
    missing = [p for p in PACKAGES if p not in packages]
    if missing:
        raise DebianBuildError(f"packages missing from the image: {', '.join(missing)}")
    return packages


# -------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmhive.guest.debian DEST_DIR``: build the image, print its path."""
    return builder_main(
        argv,
        prog="python -m vmhive.guest.debian",
        description="Build the vmhive Debian 12 guest image (debootstrap, needs root).",
        build=lambda args: build_debian_image(args.dest, args.work_dir),
    )


if __name__ == "__main__":
    sys.exit(main())
