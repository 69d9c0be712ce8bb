"""A minimal client of the QEMU guest agent, over the VM's `qga.sock` chardev.

The agent speaks QMP-like JSON on a virtio-serial port. After connecting we
send a 0xFF byte (which makes the agent drop any half-read input) and a
`guest-sync-delimited` with a random id; the agent answers with 0xFF and the
id, so replies left over from an earlier client are skipped. Only one client
at a time can hold the socket; every call here connects, talks and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any


class GuestAgentError(Exception):
    """The agent did not answer, or answered with an error."""


async def call(
    socket_path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Run one agent command; its "return" value."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            try:
                token = random.randrange(1, 2**31)
                writer.write(b"\xff")
                writer.write(_message("guest-sync-delimited", {"id": token}))
                await writer.drain()
                while True:  # skip whatever a previous client left unread
                    await reader.readuntil(b"\xff")
                    reply = await _reply(reader)
                    if reply.get("return") == token:
                        break
                writer.write(_message(command, arguments))
                await writer.drain()
                reply = await _reply(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise GuestAgentError(
            f"the guest agent did not answer {command} in {timeout:g} s"
        ) from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise GuestAgentError(f"guest agent socket: {exc}") from None
    if "error" in reply:
        desc = reply["error"].get("desc", reply["error"])
        raise GuestAgentError(f"the guest agent refused {command}: {desc}")
    return reply.get("return")


def _message(command: str, arguments: dict[str, Any] | None) -> bytes:
    body: dict[str, Any] = {"execute": command}
    if arguments:
        body["arguments"] = arguments
    return json.dumps(body).encode() + b"\n"


async def _reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    while True:
        line = (await reader.readline()).strip(b"\xff \r\n")
        if not line:
            if reader.at_eof():
                raise asyncio.IncompleteReadError(b"", None)
            continue
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict):
                return message
