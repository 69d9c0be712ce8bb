"""A real `vmhive serve` process for functional tests, driven through the real CLI.

`Hive` starts the daemon on a short data dir (AF_UNIX path limits), with the
shared tiny image directory as its image store, on a free loopback port.
Every wait has a deadline. On teardown every VM is forced off and every QEMU
the daemon started is killed, whatever state the test left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import unix_connect

VMHIVE = str(Path(sys.executable).parent / "vmhive")
READY = "vmhive-guest-ready"
BOOT_DEADLINE = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)


class Hive:
    def __init__(self, image_dir: Path, *extra_args: str, netns: str | None = None) -> None:
        """`netns`: run the daemon (and so its QEMUs, bridges, nftables and dnsmasq)
        inside that network namespace; without it the daemon creates no network."""
        self.netns = netns
        self.data_dir = Path(tempfile.mkdtemp(prefix="vh-", dir="/tmp"))
        self.image_dir = image_dir
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "daemon.log"

    # -- daemon ------------------------------------------------------------------

    def start(self) -> None:
        sock = self.data_dir / "api.sock"
        sock.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    VMHIVE,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--image-dir",
                    str(self.image_dir),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--no-demo",
                    "--accel",
                    "tcg",
                    "--stop-timeout",
                    "60",
                    *([] if self.netns else ["--no-default-network"]),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: self._answers(), 30, "the daemon's API socket")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"vmhive serve exited:\n{self.daemon_log()}")
        try:
            self.api("GET", "/api/host")
        except (httpx.HTTPError, OSError):
            return False
        return True

    def kill_daemon(self) -> None:
        """kill -9, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def daemon_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    # -- clients -----------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        transport = httpx.HTTPTransport(uds=str(self.data_dir / "api.sock"))
        with httpx.Client(transport=transport, base_url="http://vmhive", timeout=60) as client:
            return client.request(method, path, **kwargs)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> CliResult:
        env = {**os.environ, "VMHIVE_DATA_DIR": str(self.data_dir)}
        env.pop("VMHIVE_API", None)
        proc = subprocess.run(
            [VMHIVE, *args], capture_output=True, text=True, env=env, timeout=timeout, input=input
        )
        result = CliResult(proc)
        if check and result.rc != 0:
            raise AssertionError(f"vmhive {' '.join(args)} failed ({result.rc}): {result.err}")
        return result

    def vm(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self.cli("vm", "show", name, "--output", "json").json()
        return data

    def create_tiny(self, name: str, generation: int = 2, *extra: str) -> dict[str, Any]:
        memory = "128" if generation == 1 else "256"  # OVMF needs more than 128 MiB
        self.cli(
            "vm", "create", name, "--image", "tiny", "--memory", memory,
            "--vcpus", "1", "--generation", str(generation), *extra,
        )  # fmt: skip
        return self.vm(name)

    def console_log(self, name: str) -> str:
        return self.cli("vm", "console", name, "--log").out

    def wait_ready(self, name: str, timeout: float = BOOT_DEADLINE, count: int = 1) -> None:
        try:
            wait_for(
                lambda: self.console_log(name).count(READY) >= count,
                timeout,
                f"{READY} on {name}'s console",
                interval=0.5,
            )
        except TimeoutError:
            raise AssertionError(
                f"{name} did not boot; console:\n{self.console_log(name)[-3000:]}\n"
                f"QEMU log:\n{self.qemu_log(name)}"
            ) from None

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        vm: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal vm
            vm = self.vm(name)
            return bool(vm["state"] == state)

        try:
            wait_for(reached, timeout, f"{name} to be {state}", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"{name} is {vm.get('state')}, not {state}: {vm}") from None
        return vm

    def qemu_log(self, name: str) -> str:
        vm = self.vm(name)
        path = self.data_dir / "run" / vm["uuid"] / "qemu.log"
        return path.read_text(errors="replace") if path.exists() else "(no QEMU log)"

    def run_in_guest(self, name: str, command: str, timeout: float = 60) -> str:
        """Type a command on the serial console; return what it printed."""
        return asyncio.run(self._run_in_guest(name, command, timeout))

    def interactive_console(
        self, name: str, typed: bytes, expect: bytes, timeout: float = 30
    ) -> bytes:
        """Run `vmhive vm console NAME` on a pty, type, wait for `expect`, detach with Ctrl-]."""
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the CLI
            os.environ["VMHIVE_DATA_DIR"] = str(self.data_dir)
            os.execv(VMHIVE, [VMHIVE, "vm", "console", name])
        seen = b""

        def read_some() -> bool:
            nonlocal seen
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    return True
            return False

        try:
            wait_for(lambda: b"Ctrl-]" in seen or read_some(), timeout, "the console banner")
            os.write(fd, typed)
            wait_for(lambda: expect in seen or read_some(), timeout, f"{expect!r} on the console")
            os.write(fd, b"\x1d")
            wait_for(lambda: b"Detached" in seen or read_some(), timeout, "the console to detach")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, seen
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(fd)
        return seen

    def run_in_guest_nowait(self, name: str, command: str) -> None:
        """Type a command on the serial console without waiting for its output."""

        async def send() -> None:
            path = str(self.data_dir / "api.sock")
            async with unix_connect(path, uri=f"ws://vmhive/api/vms/{name}/console") as ws:
                await ws.send(f"{command}\n".encode())

        asyncio.run(send())

    async def _run_in_guest(self, name: str, command: str, timeout: float) -> str:
        token = f"@@{time.monotonic_ns()}@@"
        begin, end = f"{token}B", f"{token}E"
        # The markers are split in the typed line so the echo never matches them.
        typed = f"echo {token}'B'; {command}; echo {token}'E'\n"
        path = str(self.data_dir / "api.sock")
        async with unix_connect(path, uri=f"ws://vmhive/api/vms/{name}/console") as ws:
            await ws.send(typed.encode())
            seen = ""
            deadline = time.monotonic() + timeout
            while end not in seen.split(begin, 1)[-1] or begin not in seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no output from {command!r} on {name}: {seen[-500:]!r}")
                chunk = await asyncio.wait_for(ws.recv(), remaining)
                seen += chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
        output = seen.split(begin, 1)[1].split(end, 1)[0]
        return output.replace("\r", "").strip("\n")

    # -- teardown ----------------------------------------------------------------

    def qemu_pids(self) -> list[int]:
        marker = str(self.data_dir) + "/"
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "qemu-system" in cmdline and marker in cmdline:
                    pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        self.stop_daemon()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.qemu_pids(), 15, "test QEMUs to exit")
        shutil.rmtree(self.data_dir, ignore_errors=True)
