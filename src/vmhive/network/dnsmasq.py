"""Starting, finding, reloading and stopping one network's dnsmasq.

dnsmasq daemonizes itself: the process we start waits until the daemon has
bound its sockets, opened its files and written its pidfile, then exits 0 (or
non-zero with the reason on stderr). That exit is our readiness signal, and
the daemon, no child of ours, outlives the vmhive daemon like QEMU does.

A PID is believed only when ``/proc/PID/cmdline`` is exactly the argv we start
dnsmasq with (``dnsmasq --conf-file=<dir>/dnsmasq.conf``), which names the
network's directory: this guards against PID reuse and lets a restarted
vmhive daemon adopt the instance it finds. If the pidfile is missing or stale
the process table is searched for that argv.

Private networks run their dnsmasq in a network namespace of its own
(`vmhive.network.nsexec`): `start_dnsmasq` calls back with the PID holding the
new namespace so the caller can move an interface in before dnsmasq starts.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Final

from vmhive.network.dnsmasq_config import DnsmasqPaths, parse_leases
from vmhive.network.errors import DnsmasqError
from vmhive.network.model import Lease
from vmhive.proc import read_cmdline

DNSMASQ: Final = "/usr/sbin/dnsmasq"
START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
#: Unprivileged users dnsmasq may drop to, in order of preference.
_RUN_AS: Final = ("dnsmasq", "nobody")


@dataclass(frozen=True)
class NetnsSetup:
    """Start dnsmasq in a new network namespace whose interface `ifname` gets `address`.

    `prepare(pid)` is called with the PID of the process holding the new
    namespace (``/proc/PID/ns/net``) and must move `ifname` into it.
    """

    ifname: str
    address: IPv4Interface
    prepare: Callable[[int], None]


def dnsmasq_argv(paths: DnsmasqPaths, binary: str = DNSMASQ) -> list[str]:
    return [binary, f"--conf-file={paths.conf}"]


def dnsmasq_user() -> tuple[str, str]:
    """The (user, group) dnsmasq drops its privileges to."""
    for user in _RUN_AS:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        try:
            group = grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            continue
        return user, group
    raise DnsmasqError(f"no unprivileged user ({' or '.join(_RUN_AS)}) to run dnsmasq as")


def check_readable_by(paths: DnsmasqPaths, user: str) -> None:
    """dnsmasq re-reads its reservations as `user` on SIGHUP: every parent must let it through."""
    uid = pwd.getpwnam(user).pw_uid
    for directory in (paths.directory, *paths.directory.parents):
        st = directory.stat()
        if not (st.st_mode & stat.S_IXOTH or (st.st_uid == uid and st.st_mode & stat.S_IXUSR)):
            raise DnsmasqError(
                f"directory {directory} is not searchable by user {user}, which dnsmasq runs as: "
                "use a run directory whose parents are world-searchable (o+x)"
            )


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (dnsmasq is reparented to init,
    which in a container may never reap it)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


def _is_instance(pid: int, argv: list[str]) -> bool:
    return read_cmdline(pid) == argv and _alive(pid)


def _read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _scan_processes(argv: list[str]) -> Iterable[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_instance(int(entry.name), argv):
            yield int(entry.name)


def find_dnsmasq(paths: DnsmasqPaths, binary: str = DNSMASQ) -> int | None:
    """The PID of the running dnsmasq of `paths`, verified, or None."""
    argv = dnsmasq_argv(paths, binary)
    pid = _read_pidfile(paths.pidfile)
    if pid is not None and _is_instance(pid, argv):
        return pid
    return next(iter(_scan_processes(argv)), None)


def scan_dnsmasq_processes(run_dir: Path, binary: str = DNSMASQ) -> dict[Path, int]:
    """Running dnsmasqs of network directories directly under `run_dir`: directory -> PID.

    Found by their command line alone, so instances whose files are gone show up too.
    """
    found: dict[Path, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if argv is None or len(argv) != 2 or argv[0] != binary:
            continue
        conf = Path(argv[1].removeprefix("--conf-file="))
        if (
            argv[1].startswith("--conf-file=")
            and conf.name == "dnsmasq.conf"
            and conf.parent.parent == run_dir
            and argv == dnsmasq_argv(DnsmasqPaths(conf.parent), binary)
            and _alive(int(entry.name))
        ):
            found[conf.parent] = int(entry.name)
    return found


def _startup_error(paths: DnsmasqPaths) -> str:
    for source in (paths.stderr, paths.log):
        try:
            lines = [line.strip() for line in source.read_text(errors="replace").splitlines()]
        except OSError:
            continue
        lines = [line for line in lines if line]
        if lines:
            return lines[-1]
    return "no error message"


def _await_line(proc: subprocess.Popen[bytes], expected: bytes, deadline: float) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DnsmasqError("the namespace helper did not answer in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                break
            buf += chunk
    if buf.strip() != expected:
        raise DnsmasqError(f"the namespace helper failed: {buf.decode(errors='replace').strip()!r}")


def start_dnsmasq(
    paths: DnsmasqPaths,
    *,
    binary: str = DNSMASQ,
    netns: NetnsSetup | None = None,
    timeout: float = START_TIMEOUT,
) -> int:
    """Start the dnsmasq of `paths` (its config file must exist); return the daemon's PID.

    Returns the PID of the instance already running, if there is one. On failure
    nothing is left running and `DnsmasqError` carries dnsmasq's own message.
    """
    pid = find_dnsmasq(paths, binary)
    if pid is not None:
        return pid
    paths.pidfile.unlink(missing_ok=True)
    argv = dnsmasq_argv(paths, binary)
    if netns is not None:
        argv = [
            sys.executable,
            "-m",
            "vmhive.network.nsexec",
            "--ifname",
            netns.ifname,
            "--address",
            str(netns.address),
            "--",
            *argv,
        ]
    deadline = time.monotonic() + timeout
    with paths.stderr.open("wb") as errors:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if netns else subprocess.DEVNULL,
                stdout=subprocess.PIPE if netns else subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        except OSError as exc:
            raise DnsmasqError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        if netns is not None:
            assert proc.stdin is not None
            _await_line(proc, b"ready", deadline)
            netns.prepare(proc.pid)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise DnsmasqError(
            f"dnsmasq of {paths.directory} did not start within {timeout:.0f} s"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()
    if returncode != 0:
        stop_dnsmasq(paths, binary=binary)  # in case the daemon forked before failing
        raise DnsmasqError(
            f"dnsmasq of {paths.directory} failed to start (exit status {returncode}): "
            f"{_startup_error(paths)}"
        )
    pid = find_dnsmasq(paths, binary)
    if pid is None:
        raise DnsmasqError(f"dnsmasq of {paths.directory} started but is not running")
    return pid


def stop_dnsmasq(
    paths: DnsmasqPaths, *, binary: str = DNSMASQ, timeout: float = STOP_TIMEOUT
) -> bool:
    """Stop the dnsmasq of `paths` (SIGTERM, then SIGKILL); False if none was running."""
    pid = find_dnsmasq(paths, binary)
    stopped = False
    while pid is not None:
        for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not _alive(pid):
                break
        if _alive(pid):
            raise DnsmasqError(f"dnsmasq {pid} of {paths.directory} does not stop")
        stopped = True
        pid = find_dnsmasq(paths, binary)
    paths.pidfile.unlink(missing_ok=True)
    return stopped


def reload_dnsmasq(paths: DnsmasqPaths, *, binary: str = DNSMASQ) -> None:
    """Make the running dnsmasq re-read its reservations file (SIGHUP)."""
    pid = find_dnsmasq(paths, binary)
    if pid is None:
        raise DnsmasqError(f"dnsmasq of {paths.directory} is not running")
    os.kill(pid, signal.SIGHUP)


def write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` atomically with `text` (mode 0644) unless it holds it already."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return True


def read_leases(paths: DnsmasqPaths) -> dict[str, Lease]:
    """The current IPv4 leases, by MAC (empty when there is no lease file yet)."""
    try:
        return parse_leases(paths.leases.read_text(errors="replace"))
    except FileNotFoundError:
        return {}
