"""Facts about host processes, read from /proc."""

from __future__ import annotations

from pathlib import Path


def read_cmdline(pid: int) -> list[str] | None:
    """The argv of process `pid`; None if it is gone, a zombie or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]
