"""An asyncio fake QMP server on a unix socket, for unit tests.

It speaks enough of QEMU's side of the protocol to drive `QmpMonitor`:
a greeting, ``qmp_capabilities`` negotiation (commands before it are refused
like QEMU does), a tiny run-state model for the default commands, and, per
command, a scripted sequence of `Step`s that can misbehave: send garbage,
hang up in the middle of a reply, flood events, or never reply.

Usage::

    async with FakeQmpServer(path) as server:
        server.script("query-status", Flood(10_000), Return({"status": "running"}))
        ...
        await server.emit("RESET")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

JSON = dict[str, Any]


# -- script steps -------------------------------------------------------------


@dataclass(frozen=True)
class Return:
    """Reply successfully with ``value``."""

    value: Any = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    """Reply with a QMP error."""

    error_class: str
    desc: str


@dataclass(frozen=True)
class Event:
    """Send one event."""

    name: str
    data: JSON | None = None
    timestamp: tuple[int, int] | None = None  # (seconds, microseconds); None: now


@dataclass(frozen=True)
class Flood:
    """Send ``count`` events as fast as possible, each with ``data={"seq": i}``.

    ``special`` replaces the name of the event at a given sequence number
    (e.g. ``{10: "STOP"}``) to interleave lifecycle events.
    """

    count: int
    name: str = "FLOOD_TEST"
    special: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Raw:
    """Send these bytes verbatim."""

    data: bytes


#: Non-JSON text, terminated by a newline like a real message.
GARBAGE = Raw(b"this is {not json at all\r\n")
#: Binary junk (a NUL first byte makes json.loads() guess UTF-16 and fail decoding).
BINARY_GARBAGE = Raw(b"\x00\xff\xfe junk }{\r\n")


@dataclass(frozen=True)
class PartialReplyThenClose:
    """Send the first half of a success reply, then hang up."""

    value: Any = field(default_factory=lambda: {"status": "running", "running": True})


@dataclass(frozen=True)
class Hang:
    """Never reply to this command (later commands are still served)."""


@dataclass(frozen=True)
class Delay:
    """Sleep before the next step (blocks this connection, like a busy QEMU)."""

    seconds: float


@dataclass(frozen=True)
class Close:
    """Hang up the connection."""


Step = Return | Error | Event | Flood | Raw | PartialReplyThenClose | Hang | Delay | Close


def _event_msg(name: str, data: JSON | None, timestamp: tuple[int, int] | None = None) -> JSON:
    if timestamp is None:
        now = time.time()
        timestamp = (int(now), int((now % 1) * 1_000_000))
    msg: JSON = {
        "event": name,
        "timestamp": {"seconds": timestamp[0], "microseconds": timestamp[1]},
    }
    if data is not None:
        msg["data"] = data
    return msg


def _encode(msg: JSON) -> bytes:
    # QEMU terminates every message with CRLF.
    return json.dumps(msg).encode() + b"\r\n"


class _Hangup(Exception):
    """Internal: a step closed the connection."""


# -- the server ---------------------------------------------------------------


class FakeQmpServer:
    """A one-client-at-a-time fake of QEMU's QMP monitor on a unix socket."""

    def __init__(
        self,
        path: Path,
        *,
        send_greeting: bool = True,
        greeting: bytes | None = None,
        version: tuple[int, int, int] = (7, 2, 0),
    ) -> None:
        self.path = path
        self.send_greeting = send_greeting
        self.greeting = greeting
        self.version = version
        #: Every command received (after parsing), including qmp_capabilities.
        self.received: list[JSON] = []
        #: How many clients connected so far.
        self.connections = 0
        #: The tiny run-state model used by the default handlers.
        self.status = "running"
        self._scripts: dict[str, list[Step]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writer: asyncio.StreamWriter | None = None

    # -- lifecycle --

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop_client()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> FakeQmpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- test controls --

    def script(self, command: str, *steps: Step) -> None:
        """Answer every ``command`` with ``steps`` instead of the default handler."""
        self._scripts[command] = list(steps)

    def commands(self) -> list[str]:
        """Names of the commands received so far, in order."""
        return [str(m.get("execute", m.get("exec-oob"))) for m in self.received]

    async def emit(self, name: str, data: JSON | None = None) -> None:
        """Send an unsolicited event to the connected client."""
        await self._write(_encode(_event_msg(name, data)))

    async def drop_client(self) -> None:
        """Hang up on the connected client, if any."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- protocol --

    async def _write(self, data: bytes) -> None:
        if self._writer is None:
            raise RuntimeError("no client connected")
        self._writer.write(data)
        await self._writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self._writer = writer
        try:
            await self._session(reader, writer)
        except (_Hangup, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            if self._writer is writer:
                self._writer = None
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.send_greeting:
            await reader.read()  # say nothing until the client gives up
            return
        major, minor, micro = self.version
        greeting = self.greeting or _encode(
            {
                "QMP": {
                    "version": {
                        "qemu": {"micro": micro, "minor": minor, "major": major},
                        "package": "fake",
                    },
                    "capabilities": ["oob"],
                }
            }
        )
        await self._write(greeting)
        negotiated = False
        async for msg in self._messages(reader):
            self.received.append(msg)
            command = str(msg.get("execute", msg.get("exec-oob", "")))
            msg_id = msg.get("id")
            if command == "qmp_capabilities" and not negotiated:
                negotiated = True
                await self._run(msg_id, [Return({})])
            elif not negotiated:
                await self._run(
                    msg_id,
                    [
                        Error(
                            "CommandNotFound",
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                        )
                    ],
                )
            else:
                steps = self._scripts.get(command)
                if steps is None:
                    steps = self._default(command, msg.get("arguments") or {})
                await self._run(msg_id, steps)

    async def _messages(self, reader: asyncio.StreamReader) -> AsyncIterator[JSON]:
        """Yield JSON objects from the stream (qemu.qmp sends no separators)."""
        decoder = json.JSONDecoder()
        buf = ""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buf += chunk.decode()
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break  # incomplete; wait for more
                buf = buf[end:]
                yield obj

    async def _run(self, msg_id: Any, steps: list[Step]) -> None:
        def reply(body: JSON) -> JSON:
            if msg_id is not None:
                body["id"] = msg_id
            return body

        for step in steps:
            match step:
                case Return(value=value):
                    await self._write(_encode(reply({"return": value})))
                case Error(error_class=cls, desc=desc):
                    await self._write(_encode(reply({"error": {"class": cls, "desc": desc}})))
                case Event(name=name, data=data, timestamp=stamp):
                    await self._write(_encode(_event_msg(name, data, stamp)))
                case Flood(count=count, name=name, special=special):
                    blob = b"".join(
                        _encode(_event_msg(special.get(i, name), {"seq": i})) for i in range(count)
                    )
                    await self._write(blob)
                case Raw(data=data):
                    await self._write(data)
                case PartialReplyThenClose(value=value):
                    full = _encode(reply({"return": value}))
                    await self._write(full[: len(full) // 2])
                    await self.drop_client()
                    raise _Hangup
                case Hang():
                    return
                case Delay(seconds=seconds):
                    await asyncio.sleep(seconds)
                case Close():
                    await self.drop_client()
                    raise _Hangup

    def _default(self, command: str, arguments: JSON) -> list[Step]:
        """A minimal model of QEMU's behaviour for the commands vmhive uses."""
        major, minor, micro = self.version
        match command:
            case "query-status":
                running = self.status == "running"
                return [Return({"status": self.status, "singlestep": False, "running": running})]
            case "query-version":
                return [
                    Return(
                        {
                            "qemu": {"major": major, "minor": minor, "micro": micro},
                            "package": "fake",
                        }
                    )
                ]
            case "stop":
                self.status = "paused"
                return [Return(), Event("STOP")]
            case "cont":
                self.status = "running"
                return [Return(), Event("RESUME")]
            case "system_powerdown":
                return [Return(), Event("POWERDOWN")]
            case "system_reset":
                return [
                    Return(),
                    Event("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
                ]
            case "quit":
                self.status = "shutdown"
                return [
                    Return(),
                    Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}),
                    Close(),
                ]
            case "query-kvm":
                return [Return({"enabled": False, "present": False})]
            case "query-cpus-fast":
                return [Return([])]
            case "human-monitor-command":
                return [Return(f"fake hmp: {arguments.get('command-line', '')}\r\n")]
            case _:
                return [Error("CommandNotFound", f"The command {command} has not been found")]
