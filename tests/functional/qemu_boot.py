"""Plain qemu-system-x86_64 (TCG) guests for the image tests.

A :class:`Guest` is a QEMU process with its serial console on a unix socket
(also logged to a file) and a QMP socket; :func:`guest_factory` starts guests
and kills whatever still runs when it exits. Boots use qcow2 overlays
(:func:`overlay`) so that the cached images are never written.

A thread reads the console all the time: QEMU writes it to the socket a few
bytes at a time, so a few hundred unread bytes fill the socket buffer, and
then the guest itself stalls on console output (at shutdown, say).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

QEMU = "qemu-system-x86_64"
HAVE_QEMU = shutil.which(QEMU) is not None and shutil.which("qemu-img") is not None
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
HAVE_OVMF = OVMF_CODE.is_file() and OVMF_VARS.is_file()

GUEST_MEMORY = "128"
COMMAND_TIMEOUT = 30.0
POWERDOWN_TIMEOUT = 60.0
SLIRP_GUEST_ADDRESS = "10.0.2.15"  # QEMU user networking hands out this address

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class GuestError(AssertionError):
    pass


class Guest:
    """A QEMU process with its serial console and QMP sockets."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        memory: str = GUEST_MEMORY,
        cpus: int = 1,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.serial_path = workdir / f"{name}.serial.sock"
        self.qmp_path = workdir / f"{name}.qmp.sock"
        self.serial_log = workdir / f"{name}.serial.log"
        self.stderr_path = workdir / f"{name}.qemu.stderr"
        for path in (self.serial_path, self.qmp_path):
            path.unlink(missing_ok=True)
        self.argv = [
            QEMU,
            "-accel",
            "tcg",
            "-m",
            memory,
            "-smp",
            str(cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-chardev",
            f"socket,id=ser0,path={self.serial_path},server=on,wait=off,logfile={self.serial_log}",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *argv,
        ]
        self.buffer = bytearray()
        self._received = threading.Condition()
        self._serial_closed = False
        self.started = time.monotonic()
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self.serial = self._connect(self.serial_path, deadline=time.monotonic() + 30)
        self._reader = threading.Thread(
            target=self._read_serial, name=f"{name}-serial", daemon=True
        )
        self._reader.start()

    # ----------------------------------------------------------------- plumbing

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited early ({self.proc.returncode}):\n{self.diag()}")
            if path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(os.fspath(path))
                    return sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU socket {path} did not appear:\n{self.diag()}")
            time.sleep(0.02)

    def diag(self) -> str:
        def tail(path: Path, limit: int = 3000) -> str:
            try:
                return path.read_bytes()[-limit:].decode(errors="replace")
            except OSError:
                return "<none>"

        return (
            f"--- argv: {' '.join(self.argv)}\n"
            f"--- qemu stderr:\n{tail(self.stderr_path)}\n"
            f"--- serial log tail:\n{tail(self.serial_log)}"
        )

    def _read_serial(self) -> None:
        while True:
            try:
                data = self.serial.recv(65536)
            except OSError:
                data = b""
            with self._received:
                if data:
                    self.buffer += data
                else:
                    self._serial_closed = True
                self._received.notify_all()
            if not data:
                return

    def _pump(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for more console output."""
        with self._received:
            size = len(self.buffer)
            self._received.wait_for(
                lambda: len(self.buffer) != size or self._serial_closed, max(timeout, 0)
            )
            if len(self.buffer) == size and self._serial_closed:
                raise GuestError(f"serial console closed (QEMU exited?):\n{self.diag()}")

    def lines(self, start: int = 0) -> list[str]:
        with self._received:
            data = bytes(self.buffer[start:])
        text = _ANSI.sub(b"", data).replace(b"\r", b"")
        return text.decode(errors="replace").split("\n")

    def wait_line(
        self, predicate: Callable[[str], bool], timeout: float, start: int = 0, what: str = ""
    ) -> str:
        """The first complete serial line (stripped) matching *predicate*, within *timeout* s."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines(start)[:-1]:
                if predicate(line.strip()):
                    return line.strip()
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited while waiting for {what}:\n{self.diag()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(
                    f"timed out after {timeout:.0f}s waiting for {what}:\n{self.diag()}"
                )
            self._pump(min(remaining, 0.5))

    def wait_marker(self, marker: str, timeout: float) -> float:
        """Wait for a line that is exactly *marker*; return the seconds since QEMU started."""
        self.wait_line(lambda line: line == marker, timeout, what=marker)
        return time.monotonic() - self.started

    def send(self, text: str) -> None:
        self.serial.sendall(text.encode())

    # ------------------------------------------------------------------- guest

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, list[str]]:
        """Run a shell command on the serial console; return (exit status, output lines)."""
        token = f"{time.monotonic_ns():x}"
        start = len(self.buffer)
        # The quotes keep the markers as printed out of the echoed command line.
        self.send(f"echo B''{token}; {command}; echo E''{token} $?\n")
        self.wait_line(lambda line: line == f"B{token}", timeout, start, f"start of {command!r}")
        end = self.wait_line(
            lambda line: line.startswith(f"E{token} "), timeout, start, f"end of {command!r}"
        )
        lines = [ln.strip() for ln in self.lines(start)]
        begin = lines.index(f"B{token}")
        finish = lines.index(end, begin)
        return int(end.split()[1]), [ln for ln in lines[begin + 1 : finish] if ln]

    def qmp(self, *commands: str, timeout: float = 10.0) -> list[dict[str, object]]:
        """Run QMP commands (after qmp_capabilities); return their 'return' values."""
        deadline = time.monotonic() + timeout
        sock = self._connect(self.qmp_path, deadline)
        results: list[dict[str, object]] = []
        try:
            stream = sock.makefile("rwb", buffering=0)
            sock.settimeout(timeout)

            def reply() -> dict[str, object]:
                while True:
                    line = stream.readline()
                    if not line:
                        raise GuestError("QMP connection closed")
                    msg = json.loads(line)
                    if "return" in msg or "error" in msg:
                        return dict(msg)

            greeting = json.loads(stream.readline())
            assert "QMP" in greeting
            for command in ("qmp_capabilities", *commands):
                stream.write(json.dumps({"execute": command}).encode() + b"\n")
                msg = reply()
                if "error" in msg:
                    raise GuestError(f"QMP {command} failed: {msg['error']}")
                results.append(msg)
        finally:
            sock.close()
        return results[1:]

    def powerdown(self, timeout: float = POWERDOWN_TIMEOUT) -> float:
        """ACPI power button via QMP; wait for QEMU to exit; return seconds taken."""
        start = time.monotonic()
        self.qmp("system_powerdown")
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"QEMU still running {timeout:.0f}s after system_powerdown:\n{self.diag()}"
            ) from None
        if rc != 0:
            raise GuestError(f"QEMU exited with {rc} after system_powerdown:\n{self.diag()}")
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.serial.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
        self._reader.join(timeout=10)
        self.serial.close()


class StartGuest(Protocol):
    def __call__(
        self, name: str, argv: Sequence[str], memory: str = ..., cpus: int = ...
    ) -> Guest: ...


@contextlib.contextmanager
def guest_factory(workdir: Path) -> Iterator[StartGuest]:
    """Yield a function that starts guests in *workdir*; kill them all on exit."""
    guests: list[Guest] = []

    def start(name: str, argv: Sequence[str], memory: str = GUEST_MEMORY, cpus: int = 1) -> Guest:
        guest = Guest(name, argv, workdir, memory, cpus)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()


def overlay(
    image: Path, tmp_path: Path, name: str = "overlay.qcow2", size: str | None = None
) -> Path:
    """A qcow2 overlay backed by *image* (optionally larger: *size*, e.g. "4G")."""
    path = tmp_path / name
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(image),
            str(path),
            *([size] if size else []),
        ],
        check=True,
        timeout=60,
    )
    return path


def netdev(model: str, hostfwd: str | None = None) -> list[str]:
    """A user-networking NIC; restrict=on: DHCP works, nothing leaves the VM but *hostfwd*."""
    options = "user,id=net0,restrict=on" + (f",hostfwd={hostfwd}" if hostfwd else "")
    return ["-netdev", options, "-device", f"{model},netdev=net0,romfile="]


def uefi_pflash(tmp_path: Path) -> list[str]:
    """OVMF code (read-only) and a private copy of its variable store."""
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]


def report(record_property: Callable[[str, object], None], key: str, seconds: float) -> None:
    record_property(key, round(seconds, 2))
    print(f"{key}: {seconds:.1f}s")
