"""The daemon's single connection to a VM's serial port.

QEMU's serial chardev is a unix socket server that serves one client at a
time, so the daemon owns it: everything the guest prints goes to a size-capped
log file and to every live console subscriber; what subscribers type is
written back to the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from vmhive.hypervisor.base import Console

log = logging.getLogger(__name__)


class SerialConsole(Console):
    def __init__(self, socket_path: Path, log_path: Path, max_log_bytes: int) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.log_path = log_path
        self.max_log_bytes = max_log_bytes
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._log_size = log_path.stat().st_size if log_path.exists() else 0

    async def connect(self, timeout: float = 5.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.socket_path)), timeout
        )
        self._writer = writer
        self._reader_task = asyncio.create_task(self._pump(reader), name="serial-pump")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self._append_log(chunk)
                self._broadcast(chunk)
        except (ConnectionError, OSError) as exc:
            log.debug("serial connection %s closed: %s", self.socket_path, exc)
        finally:
            self._hang_up()

    def _append_log(self, chunk: bytes) -> None:
        with self.log_path.open("ab") as f:
            f.write(chunk)
        self._log_size += len(chunk)
        if self._log_size > self.max_log_bytes:
            keep = self.max_log_bytes // 2
            data = self.log_path.read_bytes()[-keep:]
            tmp = self.log_path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.log_path)
            self._log_size = len(data)

    def read_log(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""

    async def write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError("the serial console is not connected")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._writer = None
