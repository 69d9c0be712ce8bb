"""Consoles: the serial console and the graphical (VNC) console over websockets.

The CLI reaches both over the unix socket or with the bearer token. A browser
first asks for a one-time ticket (a CSRF-protected POST) and opens the socket
with `?ticket=`; the ticket names the user, the VM and the kind of console.

The VNC socket is QEMU's own, on a unix socket in the VM's run directory: the
daemon relays RFB bytes between it and the websocket unchanged (noVNC speaks
RFB over binary websocket frames), so nothing listens on TCP for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from pydantic import BaseModel

from vmhive.api.deps import daemon_of
from vmhive.services import specs
from vmhive.services.errors import Conflict
from vmhive.services.users import TICKET_LIFETIME, Login

router = APIRouter(tags=["consoles"])

REPLAY_BYTES = 64 * 1024  # what a browser gets back of the screen on (re)connect
RELAY_CHUNK = 64 * 1024


class TicketIn(BaseModel):
    kind: Literal["vnc", "serial"]


@router.post("/vms/{name}/console/ticket")
async def console_ticket(request: Request, name: str, body: TicketIn) -> dict[str, Any]:
    daemon = daemon_of(request)
    vm = await daemon.ctx.load_vm(name)
    if daemon.driver.console(vm.uuid) is None:
        raise Conflict(f"VM {name} is not running")
    login: Login = request.state.login
    ticket = daemon.users.issue_ticket(login.user, vm.uuid, body.kind)
    return {"ticket": ticket, "expires_in": int(TICKET_LIFETIME)}


@router.get("/vms/{name}/console/log")
async def console_log(request: Request, name: str) -> Response:
    daemon = daemon_of(request)
    vm = await daemon.ctx.load_vm(name)
    data = daemon.driver.console_log(specs.runtime_paths(daemon.settings, vm.uuid))
    return Response(data, media_type="application/octet-stream")


async def _admit(websocket: WebSocket, name: str, kind: str) -> Any | None:
    """The VM if this socket may open its console; otherwise closes it and None."""
    daemon = websocket.app.state.daemon
    try:
        vm = await daemon.ctx.load_vm(name)
    except Exception as exc:
        await websocket.close(code=4404, reason=str(exc)[:120])
        return None
    login: Login = websocket.state.login
    if login.via == "ticket":
        ticket = websocket.query_params.get("ticket", "")
        if daemon.users.take_ticket(ticket, vm.uuid, kind) is None:
            await websocket.close(code=4401, reason="the console ticket is used, expired or wrong")
            return None
    if daemon.driver.console(vm.uuid) is None:
        await websocket.close(code=4409, reason=f"VM {name} is not running")
        return None
    return vm


async def _relay(
    websocket: WebSocket,
    to_client: Coroutine[Any, Any, None],
    from_client: Callable[[bytes], Awaitable[None]],
) -> None:
    """Run `to_client` while the client's frames go to `from_client`, until
    either side ends."""
    sender = asyncio.create_task(to_client)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes") or (message.get("text") or "").encode()
            if data:
                await from_client(data)
    except (WebSocketDisconnect, ConnectionError, RuntimeError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


@router.websocket("/vms/{name}/console")
async def serial_console(websocket: WebSocket, name: str) -> None:
    """The live serial console: guest output as binary frames, input the same way.

    Browsers (ticket) first get the newest REPLAY_BYTES of the console log, so a
    reloaded page shows the screen again; other clients ask with `?replay=N`.
    """
    vm = await _admit(websocket, name, "serial")
    if vm is None:
        return
    daemon = websocket.app.state.daemon
    terminal = daemon.driver.console(vm.uuid)
    default = REPLAY_BYTES if websocket.state.login.via == "ticket" else 0
    try:
        replay = max(0, min(int(websocket.query_params.get("replay", default)), 1 << 20))
    except ValueError:
        replay = default
    await websocket.accept()
    queue = terminal.subscribe()
    if replay:
        log = daemon.driver.console_log(specs.runtime_paths(daemon.settings, vm.uuid))
        if log[-replay:]:
            await websocket.send_bytes(log[-replay:])

    async def to_client() -> None:
        while (chunk := await queue.get()) is not None:
            await websocket.send_bytes(chunk)
        await websocket.close(code=1000, reason="the VM stopped")

    try:
        await _relay(websocket, to_client(), terminal.write)
    finally:
        terminal.unsubscribe(queue)


@router.websocket("/vms/{name}/vnc")
async def vnc_console(websocket: WebSocket, name: str) -> None:
    """The graphical console: RFB bytes relayed to and from QEMU's VNC unix socket."""
    vm = await _admit(websocket, name, "vnc")
    if vm is None:
        return
    daemon = websocket.app.state.daemon
    path = specs.runtime_paths(daemon.settings, vm.uuid).vnc_socket
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, TimeoutError) as exc:
        await websocket.close(code=4409, reason=f"VNC of {name} is not reachable: {exc}"[:120])
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)

    async def to_client() -> None:
        while chunk := await reader.read(RELAY_CHUNK):
            await websocket.send_bytes(chunk)
        await websocket.close(code=1000, reason="the VM's display closed")

    async def to_vnc(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        await _relay(websocket, to_client(), to_vnc)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
