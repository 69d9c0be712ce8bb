"""Any node serves the whole API: a request about a VM another node owns is
relayed to that node, and its answer relayed back unchanged.

Sits inside `Auth`, so the request is already admitted here. HTTP requests
go on with the cluster secret and the admitted user's name; a browser's
console websocket goes on as it came (its one-time ticket lives on the owner,
which checks it), other websockets with the cluster secret. Paths under
`/api/vms/NAME` are relayed; everything else (lists, jobs, networks, nodes)
is answered from the shared database by whichever node is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, Any

import httpx
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from vmhive.api.auth import scope_header
from vmhive.services.nodes import FORWARDED_BY, FORWARDED_USER, NodeAddress

if TYPE_CHECKING:
    from vmhive.daemon import Daemon
    from vmhive.services.users import Login

VM_PATH = re.compile(r"/api/vms/([^/]+)(?:/.*)?")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "cookie",
        "x-csrf-token",
        FORWARDED_USER,
        FORWARDED_BY,
    }
)
TIMEOUT = httpx.Timeout(3700.0, connect=10.0)  # ?wait=true may wait for an hour-long job


async def forward_json(
    daemon: Daemon,
    node: NodeAddress,
    method: str,
    path: str,
    login: Login,
    json: Any = None,
    params: dict[str, str] | None = None,
) -> JSONResponse:
    """One call to another node on a user's behalf; its answer as ours."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        try:
            response = await client.request(
                method,
                f"http://{node.address}{path}",
                json=json,
                params=params,
                headers=daemon.nodes.call_headers(login.user),
            )
        except httpx.HTTPError as exc:
            return JSONResponse(
                {"detail": f"node {node.name} at {node.address} did not answer: {exc}"}, 502
            )
    headers = {k: v for k, v in response.headers.items() if k.lower() == "location"}
    return JSONResponse(response.json(), response.status_code, headers=headers)


class Forwarder:
    def __init__(self, app: ASGIApp, daemon: Daemon) -> None:
        self.app = app
        self.daemon = daemon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = VM_PATH.fullmatch(scope.get("path", "")) if scope["type"] != "lifespan" else None
        nodes = getattr(self.daemon, "nodes", None)
        if match is None or nodes is None or scope_header(scope, FORWARDED_BY.encode()) is not None:
            await self.app(scope, receive, send)  # never relay a relayed request again
            return
        owner = await nodes.owner(match.group(1))
        if owner is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send, owner)
        else:
            await self._websocket(scope, receive, send, owner)

    def _url(self, scope: Scope, node: NodeAddress, scheme: str) -> str:
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{scheme}://{node.address}{scope['path']}" + (f"?{query}" if query else "")

    def _headers(self, scope: Scope, login: Login, with_secret: bool) -> dict[str, str]:
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k.decode("latin-1") not in HOP_BY_HOP and not k.startswith(b"sec-websocket")
        }
        if with_secret:
            headers.update(self.daemon.nodes.call_headers(login.user))
        else:
            headers[FORWARDED_BY] = self.daemon.nodes.name
        return headers

    async def _http(self, scope: Scope, receive: Receive, send: Send, node: NodeAddress) -> None:
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        login: Login = scope["state"]["login"]
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            try:
                request = client.build_request(
                    scope["method"],
                    self._url(scope, node, "http"),
                    content=bytes(body),
                    headers=self._headers(scope, login, with_secret=True),
                )
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                error = JSONResponse(
                    {"detail": f"node {node.name} at {node.address} did not answer: {exc}"}, 502
                )
                await error(scope, receive, send)
                return
            try:
                headers = [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.multi_items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-encoding")
                ]
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": headers,
                    }
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, node: NodeAddress
    ) -> None:
        login: Login = scope["state"]["login"]
        # A ticket is checked by the owner: pass it on without the secret.
        headers = self._headers(scope, login, with_secret=login.via != "ticket")
        offered = scope.get("subprotocols", [])
        first = await receive()
        assert first["type"] == "websocket.connect"
        try:
            upstream = await connect(
                self._url(scope, node, "ws"),
                additional_headers=headers,
                subprotocols=offered or None,
                open_timeout=10,
                max_size=None,
            )
        except (OSError, TimeoutError, InvalidStatus) as exc:
            await send({"type": "websocket.close", "code": 4502, "reason": str(exc)[:120]})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def down() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for data in upstream:
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            code = upstream.close_code or 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code})

        task = asyncio.create_task(down())
        try:
            while True:
                message: Message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                await upstream.send(data if data is not None else message.get("text") or "")
        except ConnectionClosed:
            pass
        finally:
            await upstream.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
