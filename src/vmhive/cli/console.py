"""Interactive serial console over the daemon's websocket. Ctrl-] detaches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from vmhive.cli.client import ApiTarget, CliError

DETACH = b"\x1d"  # Ctrl-]


async def _session(target: ApiTarget, name: str) -> None:
    path = f"/api/vms/{name}/console"
    if target.socket is not None:
        ws_cm = unix_connect(str(target.socket), uri=f"ws://vmhive{path}")
    else:
        ws_cm = connect(target.ws_url(path), additional_headers=target.headers())
    try:
        async with ws_cm as ws:
            await _pump(ws)
    except InvalidStatus as exc:
        raise CliError(f"console refused: HTTP {exc.response.status_code}") from None
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code >= 4000:
            raise CliError(f"console refused: {exc.rcvd.reason}") from None


async def _pump(ws: ClientConnection) -> None:
    loop = asyncio.get_running_loop()
    stdin = sys.stdin.fileno()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(stdin, lambda: keys.put_nowait(os.read(stdin, 1024)))

    async def from_guest() -> None:
        async for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            os.write(sys.stdout.fileno(), data)

    guest = asyncio.create_task(from_guest())
    try:
        while not guest.done():
            get = asyncio.create_task(keys.get())
            done, _ = await asyncio.wait({get, guest}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                break
            data = get.result()
            if not data or DETACH in data:
                await ws.send(data.split(DETACH)[0] or b"")
                break
            await ws.send(data)
    finally:
        loop.remove_reader(stdin)
        guest.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await guest


def attach(target: ApiTarget, name: str) -> None:
    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    if interactive:
        sys.stderr.write(f"Connected to {name}'s serial console. Press Ctrl-] to detach.\r\n")
        tty.setraw(sys.stdin)
    try:
        asyncio.run(_session(target, name))
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\nDetached.\n")
