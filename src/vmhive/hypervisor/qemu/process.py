"""Launching QEMU detached, and finding it again.

QEMU runs in its own session with its stdio on files, so killing or restarting
the daemon never touches a guest. We do not use QEMU's `-daemonize` (which
forks after start-up and keeps the seccomp sandbox from denying spawn): the
supervisor detaches the process itself.

Each run directory holds `runtime.json`, the record of the exact argv a VM
was started with. A PID is only believed when /proc/PID/cmdline equals that
argv (guards against PID reuse), and the host's boot id tells a VM that died
with the host from one that crashed while the daemon was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmhive.proc import read_cmdline

RUNTIME_RECORD = "runtime.json"


class LaunchError(Exception):
    pass


def host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class RuntimeRecord:
    """What we persist about a started QEMU: enough to re-adopt it."""

    vm_uuid: str
    pid: int
    argv: list[str]
    boot_id: str
    started_at: float
    accel: str

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / (RUNTIME_RECORD + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(run_dir / RUNTIME_RECORD)

    @classmethod
    def load(cls, run_dir: Path) -> RuntimeRecord | None:
        try:
            data = json.loads((run_dir / RUNTIME_RECORD).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


def is_our_process(record: RuntimeRecord) -> bool:
    """True when record.pid is alive and is exactly the QEMU we started."""
    if record.boot_id != host_boot_id():
        return False
    return read_cmdline(record.pid) == record.argv


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = read_proc_state(pid)
    return stat is not None and stat != "Z"


def read_proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


class QemuProcess:
    """A handle on one QEMU process, started by us or re-adopted.

    `exited` is awaitable for both cases through a pidfd; the exit status is
    only known for processes that are our children (started by this daemon).
    """

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self._pidfd = os.pidfd_open(pid)
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        if self._popen is not None:
            self.returncode = self._popen.wait()
        os.close(self._pidfd)
        self._pidfd = -1
        self.exited.set()

    def exit_reason(self) -> str:
        code = self.returncode
        if code is None:
            return "QEMU exited (exit status unknown: the process was re-adopted)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"QEMU was killed by {name}"
        return f"QEMU exited with status {code}"

    def send_signal(self, sig: int) -> None:
        if self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def detach(self) -> None:
        """Stop watching without touching the process (daemon shutdown)."""
        if self._pidfd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._popen is not None:
            # Keep Popen from reaping or warning about a process that outlives us.
            self._popen.returncode = 0
            self._popen = None


def launch(argv: list[str], run_dir: Path, log_file: Path) -> QemuProcess:
    """Start QEMU in a new session with stdio on files; return at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log, open(os.devnull, "rb") as devnull:
        log.write(f"--- vmhive: starting QEMU at {time.strftime('%F %T')}\n".encode())
        log.flush()
        try:
            popen = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=log,
                stderr=log,
                cwd=run_dir,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]}: {exc}") from exc
    return QemuProcess(popen.pid, popen)


def tail(path: Path, max_bytes: int = 2000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def find_qemu_processes_under(root: Path) -> dict[int, list[str]]:
    """Every live process whose command line mentions a path under root."""
    marker = str(root.resolve()) + "/"
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if argv and "qemu" in Path(argv[0]).name and any(marker in a for a in argv):
            found[int(entry.name)] = argv
    return found


def fence(run_dir: Path) -> int | None:
    """Kill the QEMU recorded in `run_dir` if it still runs (SIGKILL: the guest
    must not write one more block) or, without a record (an incoming migration's
    QEMU, never committed), any QEMU using `run_dir`; its PID, or None if none ran."""
    record = RuntimeRecord.load(run_dir)
    if record is None:
        pids = list(find_qemu_processes_under(run_dir)) if run_dir.is_dir() else []
    else:
        pids = [record.pid] if is_our_process(record) else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids[0] if pids else None
