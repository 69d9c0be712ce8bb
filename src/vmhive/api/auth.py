"""Who may call the API, as an ASGI wrapper in front of the application.

- The unix socket (mode 0600) is trusted: only root reaches it.
- Over TCP: `Authorization: Bearer <token>` (scripts, `vmhive token`), or the
  web UI's session cookie. A cookie-authenticated request that changes state
  (any method but GET, HEAD, OPTIONS) must carry its session's CSRF token in
  `X-CSRF-Token`: a cross-site page can make the browser send the cookie, but
  cannot read the token. The cookie is also SameSite=Strict.
- Browsers open console websockets with a one-time ticket (`?ticket=`), which
  the console handler checks against the VM and kind; the ticket itself is
  obtained by a CSRF-protected POST, so a session cookie alone opens no socket.
- Nodes of a cluster call each other with the cluster secret as bearer token,
  naming the user they admitted the request for in `X-Vmhive-User`.
- The login page and its assets are public.

Each admitted request carries its `Login` in `request.state.login`.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.datastructures import MutableHeaders
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmhive.services.nodes import FORWARDED_USER
from vmhive.services.users import Login

if TYPE_CHECKING:
    from vmhive.services.users import UserService

COOKIE = "vmhive_session"
CSRF_HEADER = b"x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC = frozenset(
    {
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/favicon.ico"),
        ("POST", "/api/auth/login"),
        ("GET", "/api/auth/me"),
    }
)
PUBLIC_PREFIX = "/ui/"
TICKET_SOCKET = re.compile(r"/api/vms/[^/]+/(console|vnc)")
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
# The UI's pages: scripts and styles only from the daemon itself; xterm.js and
# noVNC set inline styles on their elements, and noVNC draws from blob/data URLs.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value)
    return None


def session_cookie(scope: Scope) -> str | None:
    raw = scope_header(scope, b"cookie")
    if raw is None:
        return None
    return cookie_parser(raw.decode("latin-1")).get(COOKIE) or None


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC or (
        method in ("GET", "HEAD") and path.startswith(PUBLIC_PREFIX)
    )


class Auth:
    def __init__(
        self, app: ASGIApp, token: str, users: UserService, cluster_secret: str = ""
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.users = users
        self.cluster_secret = cluster_secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        login = await self.identify(scope)
        if scope["type"] == "websocket":
            if login is None or login.via == "session":
                if not self._has_ticket(scope):
                    await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
                    return
                login = Login(user="", via="ticket")
        else:
            method, path = scope["method"], scope["path"]
            if login is None and not is_public(method, path):
                await self._refuse(
                    scope, receive, send, 401, "log in, or send a bearer token (see `vmhive token`)"
                )
                return
            if login is not None and login.via == "session" and method not in SAFE_METHODS:
                given = scope_header(scope, CSRF_HEADER) or b""
                if not hmac.compare_digest(given, login.csrf_token.encode()):
                    await self._refuse(scope, receive, send, 403, "missing or wrong CSRF token")
                    return
            send = self._with_security_headers(send, path)
        scope.setdefault("state", {})["login"] = login
        await self.app(scope, receive, send)

    async def identify(self, scope: Scope) -> Login | None:
        server = scope.get("server")
        if server is not None and server[1] is None and str(server[0]).startswith("/"):
            return Login(user="root", via="unix")  # the unix socket (its path, no port)
        authorization = scope_header(scope, b"authorization")
        if authorization is not None:
            scheme, _, given = authorization.partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            if hmac.compare_digest(given.strip(), self.token):
                return Login(user="token", via="token")
            if self.cluster_secret and hmac.compare_digest(given.strip(), self.cluster_secret):
                # Another node, forwarding a request it admitted for this user.
                user = (scope_header(scope, FORWARDED_USER.encode()) or b"node").decode("latin-1")
                return Login(user=user, via="node")
            return None
        cookie = session_cookie(scope)
        if cookie is not None:
            return await self.users.session_login(cookie)
        return None

    @staticmethod
    def _has_ticket(scope: Scope) -> bool:
        if not TICKET_SOCKET.fullmatch(scope["path"]):
            return False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return bool(query.get("ticket"))

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
        await response(scope, receive, send)

    @staticmethod
    def _with_security_headers(send: Send, path: str) -> Send:
        page = not path.startswith("/api/") and path != "/metrics"

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if page:
                    headers.setdefault("content-security-policy", PAGE_POLICY)
            await send(message)

        return wrapped
