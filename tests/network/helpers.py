"""Network namespaces as hosts and VMs, for the functional network tests.

A `Netns` is a named namespace created with ``ip netns add``. Commands run in
it with ``ip netns exec``; library functions run in it through a worker process
(`tests.network.nsworker`) with `Netns.call`, so nothing the code under test
does can reach the real host's interfaces, routes, sysctls or nftables.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from tests.network.nsworker import netns_inode, read_frame, write_frame

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
COMMAND_TIMEOUT = 30.0
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def random_token(length: int = 6) -> str:
    return secrets.token_hex(length)[:length]


class Netns:
    """One network namespace, deleted (with every process in it) by `close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=COMMAND_TIMEOUT)
        self._worker: subprocess.Popen[bytes] | None = None
        self.run("ip", "link", "set", "lo", "up")

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    # -- commands

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {' '.join(cmd)} exited with {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def popen(self, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*cmd), text=True, start_new_session=True, **kwargs)

    def ping(self, address: IPv4Address | str, *, source: str | None = None) -> bool:
        cmd = ["ping", "-n", "-c", "1", "-W", "1"]
        if source is not None:
            cmd += ["-I", source]
        return self.run(*cmd, str(address), check=False).returncode == 0

    def nft_ruleset(self) -> str:
        return self.run("nft", "list", "ruleset").stdout

    def sysctl(self, key: str) -> str:
        return self.run("cat", f"/proc/sys/{key}").stdout.strip()

    # -- library calls through the worker

    def _start_worker(self) -> subprocess.Popen[bytes]:
        worker = subprocess.Popen(
            self.argv(PYTHON, "-m", "tests.network.nsworker", str(netns_inode())),
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._worker = worker
        status, value = self._receive()
        if status != "ok":
            raise value
        return worker

    def _receive(self) -> tuple[str, Any]:
        assert self._worker is not None and self._worker.stdout is not None
        try:
            return read_frame(self._worker.stdout)  # type: ignore[no-any-return]
        except EOFError:
            raise AssertionError(f"the worker in {self.name} died") from None

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`func(*args, **kwargs)` run inside the namespace; its exception is re-raised here."""
        worker = self._worker or self._start_worker()
        assert worker.stdin is not None
        write_frame(worker.stdin, (func, args, kwargs))
        status, value = self._receive()
        if status == "err":
            raise value
        return value  # type: ignore[no-any-return]

    def restart_worker(self) -> None:
        """Stop the worker (as a daemon restart would); the next `call` starts a new one."""
        worker, self._worker = self._worker, None
        if worker is not None:
            assert worker.stdin is not None
            worker.stdin.close()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()

    # -- topology

    def veth_to(self, other: Netns, here: str, there: str) -> None:
        """A veth with end `here` in this namespace and `there` in `other`, both up."""
        self.run(
            "ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", other.name
        )
        self.run("ip", "link", "set", here, "up")
        other.run("ip", "link", "set", there, "up")

    def close(self) -> None:
        self.restart_worker()
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            kill_and_wait(int(pid))
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=COMMAND_TIMEOUT)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def kill_and_wait(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_until(lambda: not _alive(pid), timeout, f"process {pid} to die")


def processes_with_arg_prefix(prefix: str) -> list[int]:
    """PIDs of live processes with an argument starting with `prefix`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(prefix) for arg in args) and _alive(
            int(entry.name)
        ):
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------
# guests played by namespaces

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
	ip -4 addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	[ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
	echo "lease $ip router ${router:-none}"
	;;
esac
exit 0
"""


def dhcp(vm: Netns, script_dir: Path, *, iface: str = "eth0", hostname: str | None = None) -> str:
    """Run busybox's DHCP client once in `vm`; return its output ("lease IP router R")."""
    script = script_dir / "udhcpc.sh"
    if not script.exists():
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
    cmd = [
        "busybox",
        "udhcpc",
        "-i",
        iface,
        "-n",
        "-q",
        "-f",
        "-t",
        "8",
        "-T",
        "1",
        "-s",
        str(script),
    ]
    if hostname is not None:
        cmd += ["-x", f"hostname:{hostname}"]
    result = vm.run(*cmd, check=False, timeout=30)
    assert result.returncode == 0, f"no DHCP lease in {vm.name}: {result.stdout}{result.stderr}"
    return next(line for line in result.stdout.splitlines() if line.startswith("lease "))


TCP_SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"{sys.argv[2]} {peer[0]}\\n".encode())
    conn.close()
"""

TCP_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.makefile().readline().strip())
except OSError as exc:
    print(f"failed: {exc}")
    sys.exit(1)
"""


def start_tcp_server(ns: Netns, port: int, tag: str) -> subprocess.Popen[str]:
    """A server in `ns` answering every connection with "TAG PEER-IP"; waits until it listens."""
    proc = ns.popen(PYTHON, "-c", TCP_SERVER, str(port), tag, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], COMMAND_TIMEOUT)
    line = proc.stdout.readline().strip() if ready else ""
    assert line == "listening", f"TCP server in {ns.name} did not start: {line!r}"
    return proc


def tcp_request(ns: Netns, host: str, port: int, timeout: float = 2.0) -> str | None:
    """Connect from `ns` to host:port; the server's answer, or None if the connection failed."""
    result = ns.run(PYTHON, "-c", TCP_CLIENT, host, str(port), str(timeout), check=False)
    return result.stdout.strip() if result.returncode == 0 else None
