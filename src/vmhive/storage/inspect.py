"""Safe inspection and conversion of untrusted disk images.

Imported images come from other hypervisors, downloads and users, so every
byte of them is hostile until proven otherwise. The classic attacks (see the
qemu-img CVE history and OpenStack's ``format_inspector``) all make qemu read
something other than the file it was given, or burn the host's CPU/memory:

* a qcow2 (or vmdk) whose backing file is ``/etc/shadow``;
* a qcow2 with an external data file;
* a "raw" file whose first bytes are a qcow2 header, so that format probing
  turns guest-written data into host-side metadata;
* a vmdk text descriptor whose extents are host files;
* ``json:{...}`` or ``proto:`` file names, which qemu parses as options;
* an absurd virtual size or a metadata bomb.

Defences, in order:

1. The path is made absolute (so ``nbd:``/``json:`` prefixes cannot apply) and
   must be a regular file; names starting with ``json:`` are refused outright.
2. The format is never probed by qemu: it is either given explicitly or taken
   from magic bytes by :func:`detect_format`, and every qemu-img call gets
   ``-f``.
3. qcow2 and vmdk headers are parsed here, in Python, *before* qemu-img runs,
   because ``qemu-img info`` opens a qcow2 data file and a vmdk descriptor's
   extents while it inspects the image.
4. ``qemu-img info`` output is checked again for backing files, data files,
   foreign extents, corruption and size (defence in depth), then
   ``qemu-img check`` runs for the formats that support it.
5. Every qemu-img runs under ``prlimit`` CPU-time and address-space limits, as
   OpenStack does, and a process stopped by them is reported as a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmhive.storage import qemu_img
from vmhive.storage.qemu_img import QemuImgError

SUPPORTED_FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vdi", "vpc")

# On QEMU 7.2 `qemu-img check` works for these; raw and vpc answer "This image
# format does not support checks" (exit status 63).
CHECKABLE_FORMATS = frozenset({"qcow2", "vmdk", "vhdx", "vdi"})

DEFAULT_MAX_VIRTUAL_SIZE = 16 * 1024**4

ProgressFn = Callable[[int], Awaitable[None]]

_QCOW2_MAGIC = b"QFI\xfb"
_VMDK_SPARSE_MAGIC = b"KDMV"
_VMDK_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
_VHDX_MAGIC = b"vhdxfile"
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
_VDI_SIGNATURE_OFFSET = 0x40
_VPC_MAGIC = b"conectix"

# Formats qemu knows but vmhive does not import. With --format auto such a file
# would silently become a raw volume full of foreign metadata; refusing it and
# pointing at --format raw is kinder.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"QED\x00", "QED"),
    (b"COWD", "VMDK3 (COWD)"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
)

_VMDK_SINGLE_FILE_TYPES = frozenset({"monolithicSparse", "streamOptimized"})

# qcow2 incompatible feature bits (docs/interop/qcow2.txt).
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2

_HEADER_READ = 64 * 1024


class UnsafeImage(Exception):
    """The image was refused; the message is one sentence meant for the user."""


class ResourceLimitExceeded(UnsafeImage):
    """qemu-img was stopped by its CPU-time or memory limit."""


@dataclass(frozen=True)
class ImageFacts:
    """What a successful :func:`inspect_image` established about an image."""

    format: str
    virtual_size: int
    actual_size: int


@dataclass(frozen=True)
class ResourceLimits:
    """Limits applied with ``prlimit`` (the values OpenStack uses for qemu-img info).

    RLIMIT_AS counts reserved, not used, memory, so the child also gets
    ``MALLOC_ARENA_MAX=1`` and an 8 MiB stack limit: otherwise glibc reserves
    a 64 MiB malloc arena per thread (up to 8 per CPU) and each thread's stack
    follows RLIMIT_STACK (32 MiB when unlimited), and a multi-threaded
    ``qemu-img convert`` then aborts in ``qemu_thread_create`` on a many-core
    host even though it uses ~25 MiB.
    """

    cpu_seconds: int = 30
    address_space: int = 1024**3


DEFAULT_LIMITS = ResourceLimits()
_STACK_LIMIT = 8 * 1024**2

_INFO_TIMEOUT = 120.0
_CHECK_TIMEOUT = 1800.0

# Messages of a process that ran out of address space: qemu's own ENOMEM
# reports, GLib's g_malloc abort, the dynamic loader, and thread creation
# failing under RLIMIT_AS.
_MEMORY_ERROR_RE = re.compile(
    r"cannot allocate memory|could not allocate|failed to allocate|out of memory"
    r"|failed to map segment|qemu_thread_create",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _qemu_reason(stderr: str) -> str:
    """The last qemu-img error line, without the "qemu-img: Could not open '...':" noise."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "no error message"
    reason = lines[-1].removeprefix("qemu-img:").strip()
    reason = re.sub(r"^(Could not open '[^']*': )+", "", reason)
    return reason.rstrip(".")


async def _run_limited(
    argv: Sequence[str],
    *,
    what: str,
    limits: ResourceLimits = DEFAULT_LIMITS,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> _Result:
    """Run ``argv`` under ``prlimit`` and return its exit status and output.

    Raises :class:`ResourceLimitExceeded` if the process was stopped by the
    limits, and :class:`UnsafeImage` if it crashed or overran ``timeout``
    (wall clock: the CPU limit does not cover a process blocked on I/O).
    ``what`` completes the sentence "... while {what}". The process is killed
    if the caller is cancelled. With ``progress``, stdout is parsed for the
    ``(42.00/100%)`` lines of ``qemu-img convert -p``.
    """
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise RuntimeError("prlimit (util-linux) is required to run qemu-img on untrusted images")
    command = Path(argv[0]).name
    proc = await asyncio.create_subprocess_exec(
        prlimit,
        f"--cpu={limits.cpu_seconds}",
        f"--as={limits.address_space}",
        f"--stack={_STACK_LIMIT}",
        "--",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},
        preexec_fn=qemu_img.die_with_parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout_pipe, stderr_pipe = proc.stdout, proc.stderr

    async def read_stdout() -> bytes:
        if progress is None:
            return await stdout_pipe.read()
        out = bytearray()
        buf = b""
        last = -1
        while chunk := await stdout_pipe.read(256):
            out += chunk
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                m = re.search(rb"\((\d+(?:\.\d+)?)/100%\)", part)
                if m and (percent := int(float(m.group(1)))) != last:
                    last = percent
                    await progress(percent)
        return bytes(out)

    try:
        async with asyncio.timeout(timeout):
            out, err = await asyncio.gather(read_stdout(), stderr_pipe.read())
            returncode = await proc.wait()
    except TimeoutError:
        raise UnsafeImage(
            f"{command} took longer than {timeout:g} s while {what}, so it was stopped."
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    result = _Result(returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        # prlimit sets soft == hard, and Linux sends SIGKILL at the hard limit.
        raise ResourceLimitExceeded(
            f"{command} was killed after reaching its CPU time limit "
            f"({limits.cpu_seconds} s) while {what}, which suggests a malformed or hostile image."
        )
    if returncode != 0 and _MEMORY_ERROR_RE.search(result.stderr):
        raise ResourceLimitExceeded(
            f"{command} ran out of its memory limit ({_human(limits.address_space)}) "
            f"while {what}, which suggests a malformed or hostile image."
        )
    if returncode < 0:
        raise UnsafeImage(
            f"{command} crashed (signal {-returncode}) while {what}, "
            "which suggests a malformed or hostile image."
        )
    return result


def _safe_path(path: Path) -> Path:
    """Absolute path to a regular file, safe to hand to qemu-img.

    qemu treats "json:{...}" as inline options and "proto:..." as a protocol;
    an absolute path starts with "/" so neither can apply, but names starting
    with "json:" are refused outright as well.
    """
    if str(path).startswith("json:") or path.name.startswith("json:"):
        raise UnsafeImage(
            f"Refusing {str(path)!r}: file names starting with 'json:' are "
            "interpreted by qemu as options rather than files."
        )
    resolved = path.resolve()
    st = resolved.stat()  # FileNotFoundError propagates as is
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeImage(f"{path} is not a regular file.")
    return resolved


def _read_head_tail(path: Path) -> tuple[bytes, bytes, int]:
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER_READ)
        tail = b""
        if size >= 512:
            f.seek(size - 512)
            tail = f.read(512)
    return head, tail, size


def detect_format(path: Path) -> str:
    """Guess an image's format from its magic bytes, without asking qemu-img.

    qemu's own probing is deliberately avoided (it has been the root of
    several CVEs, and it guesses rather than refuses). Anything unrecognised
    is "raw", which is always safe: raw data is never interpreted as metadata.
    """
    head, tail, size = _read_head_tail(path)
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(_VMDK_SPARSE_MAGIC):
        return "vmdk"
    if head.startswith(_VHDX_MAGIC):
        return "vhdx"
    if head[_VDI_SIGNATURE_OFFSET : _VDI_SIGNATURE_OFFSET + 4] == _VDI_SIGNATURE:
        return "vdi"
    if head.startswith(_VPC_MAGIC):  # dynamic VHD: copy of the footer at offset 0
        return "vpc"
    if head.startswith(_VMDK_DESCRIPTOR_MAGIC):
        return "vmdk"
    # Fixed VHD: a 512-byte footer (511 bytes in some old Virtual PC versions).
    if size >= 512 and (tail.startswith(_VPC_MAGIC) or tail[1:].startswith(_VPC_MAGIC)):
        return "vpc"
    return "raw"


def _foreign_format(head: bytes) -> str | None:
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return name
    return None


def _precheck_qcow2(head: bytes, name: str, max_virtual_size: int) -> None:
    """Refuse a qcow2 whose header asks qemu to open other files, before qemu sees it."""
    if len(head) < 72 or not head.startswith(_QCOW2_MAGIC):
        return  # not a qcow2 header at all: qemu-img info will say so
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    (virtual_size,) = struct.unpack_from(">Q", head, 24)
    (crypt_method,) = struct.unpack_from(">I", head, 32)
    if version not in (2, 3):
        return  # qcow v1 or garbage: the qcow2 driver refuses it with a clear error
    if backing_offset:
        backing = head[backing_offset : backing_offset + min(backing_size, 1023)]
        shown = f" ({backing.decode(errors='replace')})" if backing else ""
        raise UnsafeImage(
            f"{name} is a qcow2 overlay with a backing file{shown}; "
            "only standalone images can be imported."
        )
    if version >= 3 and len(head) >= 80:
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise UnsafeImage(
                f"{name} is a qcow2 image that keeps its data in an external file; "
                "only self-contained images can be imported."
            )
        if incompatible & _QCOW2_INCOMPAT_CORRUPT:
            raise UnsafeImage(f"{name} is a qcow2 image marked as corrupt.")
    if crypt_method:
        raise UnsafeImage(f"{name} is an encrypted qcow2 image, which cannot be imported.")
    if virtual_size > max_virtual_size:
        raise UnsafeImage(
            f"{name} claims a virtual size of {_human(virtual_size)}, "
            f"more than the {_human(max_virtual_size)} limit."
        )


_EXTENT_RE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+\d+\s+(\w+)(?:\s+"([^"]*)")?', re.MULTILINE)
_DESC_KEY_RE = re.compile(r'^\s*(\w+)\s*=\s*"?([^"\r\n]*)"?\s*$', re.MULTILINE)


def _precheck_vmdk(path: Path, head: bytes, name: str) -> None:
    """Accept only single-file sparse vmdk (monolithicSparse / streamOptimized).

    qemu's vmdk driver treats any file not starting with a sparse magic as a
    text descriptor and opens the extents it lists, so this must be decided
    before qemu-img runs at all.
    """
    if not head.startswith(_VMDK_SPARSE_MAGIC):
        text = head.decode("latin-1")
        files = [m.group(3) for m in _EXTENT_RE.finditer(text) if m.group(3)]
        refs = f" ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""
        raise UnsafeImage(
            f"{name} is a VMDK descriptor that refers to other files{refs}; "
            "only single-file VMDK images (monolithicSparse or streamOptimized) can be imported."
        )
    if len(head) < 44:
        return  # truncated header: qemu-img info reports it
    desc_offset, desc_size = struct.unpack_from("<QQ", head, 28)
    if not desc_offset or not desc_size:
        return  # no embedded descriptor; qemu-img info decides the rest
    start, length = desc_offset * 512, min(desc_size * 512, _HEADER_READ)
    with path.open("rb") as f:
        f.seek(start)
        text = f.read(length).split(b"\0", 1)[0].decode("latin-1")
    keys = {k: v.strip() for k, v in _DESC_KEY_RE.findall(text)}
    create_type = keys.get("createType")
    if create_type is not None and create_type not in _VMDK_SINGLE_FILE_TYPES:
        raise UnsafeImage(
            f"{name} is a '{create_type}' VMDK; only single-file VMDK images "
            "(monolithicSparse or streamOptimized) can be imported."
        )
    if keys.get("parentFileNameHint"):
        raise UnsafeImage(
            f"{name} is a VMDK delta disk with a parent ({keys['parentFileNameHint']}); "
            "only standalone images can be imported."
        )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _check_info(info: dict[str, Any], *, fmt: str, path: Path, max_virtual_size: int) -> ImageFacts:
    """Refuse on anything in ``qemu-img info`` output that makes the image unsafe.

    The Python pre-checks catch most of these first; this is the second line,
    using qemu's own reading of the image.
    """
    name = path.name
    found = info.get("format")
    if found != fmt:
        raise UnsafeImage(f"qemu-img read {name} as {found!r} instead of the requested {fmt!r}.")
    if any(s.startswith("json:") for s in _strings(info)):
        raise UnsafeImage(f"{name} refers to a 'json:' pseudo-file name, which is not allowed.")
    for key in ("backing-filename", "full-backing-filename", "backing-image"):
        if info.get(key):
            raise UnsafeImage(
                f"{name} has a backing file ({info[key]}); only standalone images can be imported."
            )
    details = (info.get("format-specific") or {}).get("data") or {}
    data_file = details.get("data-file") or info.get("data-file")
    if data_file:
        raise UnsafeImage(
            f"{name} keeps its data in an external file ({data_file}); "
            "only self-contained images can be imported."
        )
    if details.get("corrupt"):
        raise UnsafeImage(f"{name} is a qcow2 image marked as corrupt.")
    if info.get("encrypted"):
        raise UnsafeImage(f"{name} is encrypted, which cannot be imported.")
    if fmt == "vmdk":
        create_type = details.get("create-type")
        if create_type not in _VMDK_SINGLE_FILE_TYPES:
            raise UnsafeImage(
                f"{name} is a '{create_type}' VMDK; only single-file VMDK images "
                "(monolithicSparse or streamOptimized) can be imported."
            )
        own = info.get("filename")
        foreign = [
            e.get("filename") for e in details.get("extents", []) if e.get("filename") != own
        ]
        if foreign:
            raise UnsafeImage(
                f"{name} is a VMDK whose extents are other files ({', '.join(map(str, foreign))}); "
                "only single-file VMDK images can be imported."
            )
    virtual_size = int(info.get("virtual-size", 0))
    if virtual_size > max_virtual_size:
        raise UnsafeImage(
            f"{name} has a virtual size of {_human(virtual_size)}, "
            f"more than the {_human(max_virtual_size)} limit."
        )
    if virtual_size <= 0:
        raise UnsafeImage(f"{name} has a virtual size of 0 bytes.")
    return ImageFacts(
        format=fmt, virtual_size=virtual_size, actual_size=int(info.get("actual-size", 0))
    )


async def _qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    result = await _run_limited(
        ["qemu-img", "info", "--output=json", "-U", "-f", fmt, str(path)],
        what=f"inspecting {path.name}",
        timeout=_INFO_TIMEOUT,
    )
    if result.returncode != 0:
        raise UnsafeImage(
            f"{path.name} is not a valid {fmt} image ({_qemu_reason(result.stderr)})."
        )
    try:
        info: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise UnsafeImage(f"qemu-img could not describe {path.name} as a {fmt} image.") from None
    return info


async def _qemu_check(path: Path, fmt: str) -> None:
    """Run ``qemu-img check``; leaked clusters (exit status 3) are harmless and accepted."""
    result = await _run_limited(
        ["qemu-img", "check", "--output=json", "-U", "-f", fmt, str(path)],
        what=f"checking {path.name}",
        timeout=_CHECK_TIMEOUT,
    )
    if result.returncode == 63:  # "This image format does not support checks"
        return
    report: dict[str, Any] = {}
    with contextlib.suppress(json.JSONDecodeError):
        report = json.loads(result.stdout) if result.stdout.strip() else {}
    corruptions = int(report.get("corruptions", 0))
    errors = int(report.get("check-errors", 0))
    if result.returncode == 2 or corruptions:
        raise UnsafeImage(
            f"{path.name} is a damaged {fmt} image: qemu-img check found "
            f"{corruptions or 'some'} corruption{'' if corruptions == 1 else 's'}."
        )
    if result.returncode not in (0, 3) or errors:
        raise UnsafeImage(
            f"{path.name} could not be checked as a {fmt} image ({_qemu_reason(result.stderr)})."
        )


async def _inspect(path: Path, fmt: str, max_virtual_size: int, *, check: bool) -> ImageFacts:
    """Pre-checks, then ``qemu-img info`` (and ``check``) on a path from :func:`_safe_path`."""
    head, _tail, _size = _read_head_tail(path)
    if fmt == "qcow2":
        _precheck_qcow2(head, path.name, max_virtual_size)
    elif fmt == "vmdk":
        _precheck_vmdk(path, head, path.name)
    info = await _qemu_info(path, fmt)
    facts = _check_info(info, fmt=fmt, path=path, max_virtual_size=max_virtual_size)
    if check and fmt in CHECKABLE_FORMATS:
        await _qemu_check(path, fmt)
    return facts


async def inspect_image(
    path: Path, fmt: str = "auto", *, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
) -> ImageFacts:
    """Decide whether an untrusted image is safe to use, and describe it.

    ``fmt="auto"`` uses :func:`detect_format` (never qemu's probing); an
    explicit ``fmt`` is used exactly, so a raw disk whose first sector happens
    to hold a qcow2 header is safe when imported as ``raw``.

    Raises :class:`UnsafeImage` (one sentence for the user) on refusal,
    ``ValueError`` for an unknown ``fmt`` and ``FileNotFoundError`` for a
    missing file.
    """
    if fmt != "auto" and fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"unsupported image format {fmt!r}; use auto or one of {SUPPORTED_FORMATS}"
        )
    safe = _safe_path(path)
    if fmt == "auto":
        fmt = detect_format(safe)
        if fmt == "raw" and (foreign := _foreign_format(_read_head_tail(safe)[0])):
            raise UnsafeImage(
                f"{safe.name} looks like a {foreign} image, which vmhive cannot import; "
                "use --format raw to import its bytes as they are."
            )
    return await _inspect(safe, fmt, max_virtual_size, check=True)


def _convert_cpu_seconds(virtual_size: int) -> int:
    """CPU budget for a conversion: the inspection budget plus 1 s per 16 MiB.

    Conversion time legitimately grows with the image (decompressing a
    streamOptimized vmdk or a compressed qcow2), so the 30 s used for
    ``info`` would fail large honest imports; this still bounds a runaway.
    """
    return DEFAULT_LIMITS.cpu_seconds + virtual_size // (16 * 1024**2)


async def convert_image(
    src: Path,
    facts: ImageFacts,
    dest: Path,
    *,
    progress: ProgressFn | None = None,
) -> None:
    """Convert an inspected image to qcow2 at ``dest``.

    The source is re-inspected first (header pre-checks and ``qemu-img info``,
    not the slower ``check``) and must still match ``facts``, which narrows the
    window for swapping the file after :func:`inspect_image`. qemu-img writes
    to a hidden temporary file next to ``dest`` that is renamed into place only
    after the result has been verified, and removed on failure or
    cancellation. ``dest`` must not exist. ``progress`` receives whole percents.
    """
    safe = _safe_path(src)
    if facts.format not in SUPPORTED_FORMATS:
        raise ValueError(f"unsupported image format {facts.format!r}")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    limit = max(facts.virtual_size, DEFAULT_MAX_VIRTUAL_SIZE)
    now = await _inspect(safe, facts.format, limit, check=False)
    if now.virtual_size != facts.virtual_size:
        raise UnsafeImage(f"{safe.name} changed since it was inspected; inspect it again.")

    dest = dest.absolute()
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    limits = ResourceLimits(cpu_seconds=_convert_cpu_seconds(facts.virtual_size))
    try:
        result = await _run_limited(
            ["qemu-img", "convert", "-p", "-f", facts.format, "-O", "qcow2", str(safe), str(tmp)],
            what=f"converting {safe.name}",
            limits=limits,
            progress=progress,
        )
        if result.returncode != 0:
            raise QemuImgError(
                f"qemu-img convert failed for {safe.name}: {_qemu_reason(result.stderr)}"
            )
        out = _check_info(
            await _qemu_info(tmp, "qcow2"),
            fmt="qcow2",
            path=tmp,
            max_virtual_size=facts.virtual_size,
        )
        if out.virtual_size != facts.virtual_size:
            raise QemuImgError(
                f"converted {safe.name} has {out.virtual_size} bytes instead of {facts.virtual_size}"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
