"""qemu-img, always with an explicit format and JSON output."""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ProgressFn = Callable[[int], Awaitable[None]]

_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class QemuImgError(Exception):
    pass


def parse_size(text: str) -> int:
    """Parse a disk size such as "512M", "10G", "1T" or a byte count.

    >>> parse_size("10G")
    10737418240
    >>> parse_size("512MiB")
    536870912
    """
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 10G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the daemon dies (even by kill -9),
    so no qemu-img writes on into files that recovery is about to remove."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def _run(*args: str, progress: ProgressFn | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    if progress is None:
        stdout, stderr = await proc.communicate()
        out += stdout
    else:
        # `qemu-img convert -p` redraws "    (42.00/100%)" with carriage returns.
        buf = b""
        while chunk := await proc.stdout.read(256):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                m = re.search(rb"\((\d+(?:\.\d+)?)/100%\)", part)
                if m:
                    await progress(int(float(m.group(1))))
        stderr = await proc.stderr.read()
        await proc.wait()
    if proc.returncode != 0:
        raise QemuImgError(f"qemu-img {args[0]} failed: {stderr.decode(errors='replace').strip()}")
    return out.decode()


async def info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    # -U: reading the header of an image a running VM holds locked is safe.
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    result: dict[str, Any] = json.loads(await _run(*args, str(path)))
    return result


async def create_blank(path: Path, size: int, fmt: str = "qcow2") -> None:
    await _run("create", "-q", "-f", fmt, str(path), str(size))


async def create_overlay(path: Path, backing: Path, backing_fmt: str, size: int | None) -> None:
    args = ["create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_fmt, str(path)]
    if size is not None:
        args.append(str(size))
    await _run(*args)


async def convert(
    src: Path, src_fmt: str, dest: Path, dest_fmt: str = "qcow2", progress: ProgressFn | None = None
) -> None:
    await _run(
        "convert", "-p", "-f", src_fmt, "-O", dest_fmt, str(src), str(dest), progress=progress
    )


async def resize(path: Path, size: int, fmt: str = "qcow2") -> None:
    await _run("resize", "-q", "-f", fmt, str(path), str(size))


# -- internal snapshots (of an image no running QEMU holds open) ----------------------


def _qcow2_opts(path: Path) -> str:
    """`qemu-img snapshot` has no -f: the format is given as image options instead."""
    return f"driver=qcow2,file.filename={str(path).replace(',', ',,')}"


async def snapshot_create(path: Path, tag: str) -> None:
    await _run("snapshot", "--image-opts", "-q", "-c", tag, _qcow2_opts(path))


async def snapshot_apply(path: Path, tag: str) -> None:
    """Make the image's present content that of snapshot `tag` (the snapshot stays)."""
    await _run("snapshot", "--image-opts", "-q", "-a", tag, _qcow2_opts(path))


async def snapshot_delete(path: Path, tag: str) -> None:
    await _run("snapshot", "--image-opts", "-q", "-d", tag, _qcow2_opts(path))


async def snapshots(path: Path) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 image (name, vm-state-size, ...); safe on a
    running VM's image (-U): the snapshot table is only read."""
    found: list[dict[str, Any]] = (await info(path, "qcow2")).get("snapshots", [])
    return found


async def check(path: Path, *, repair_leaks: bool = False) -> str:
    """`qemu-img check`: "clean", "leaks" (wasted space only) or "corrupt".

    With `repair_leaks`, leaked clusters (what a QEMU killed in the middle of writing
    metadata leaves) are freed and the result is that of the image afterwards.
    """
    args = ["check", "-q", "-f", "qcow2", *(["-r", "leaks"] if repair_leaks else []), str(path)]
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    _, stderr = await proc.communicate()
    # Exit status: 0 clean, 2 corruptions, 3 leaks only; 1 means check could not run.
    if proc.returncode == 0:
        return "clean"
    if proc.returncode == 3:
        return "leaks"
    if proc.returncode == 2:
        return "corrupt"
    raise QemuImgError(f"qemu-img check failed: {stderr.decode(errors='replace').strip()}")


async def convert_snapshot(
    src: Path, tag: str, dest: Path, progress: ProgressFn | None = None
) -> None:
    """A flat qcow2 copy of internal snapshot `tag` of `src` (and what it sees of its
    backing chain). -U: a snapshot's clusters never change while it exists, so the
    copy is safe while a running VM holds the image."""
    await _run(
        "convert", "-p", "-U", "-f", "qcow2", "-l", f"snapshot.name={tag}",
        "-O", "qcow2", str(src), str(dest), progress=progress,
    )  # fmt: skip
