"""Web UI users, their login sessions, and one-time console tickets.

Passwords are hashed with scrypt (hashlib; N=2^14, r=8, p=1, 16-byte salt), in a
thread so a login does not stall the event loop. A session is a random cookie of
which only the SHA-256 is stored, with its own CSRF token and an absolute expiry.
A console ticket is a random string valid once, for 30 s, for one user, one VM
and one kind of console; tickets live in memory only (a restart voids them,
which costs a viewer one reconnect).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.store.models import LoginSession, User, utcnow

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_LIFETIME = timedelta(hours=12)
TICKET_LIFETIME = 30.0
TICKET_KINDS = ("vnc", "serial")
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")
ADMIN = "admin"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        given = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=2**26,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(given, expected)


# A hash to verify against when the user does not exist, so that a login's
# duration does not tell which user names exist.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def check_user_name(name: str) -> None:
    if not USER_NAME.fullmatch(name):
        raise InvalidRequest(
            f"bad user name {name!r}: lower-case letters, digits, '_', '.', '-' "
            "(at most 64, starting with a letter or '_')"
        )


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")


def _session_key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


@dataclass(frozen=True)
class Login:
    """Who a request is: `via` is unix (the local socket), token, session or ticket."""

    user: str
    via: str
    csrf_token: str = ""


@dataclass
class _Ticket:
    user: str
    vm_uuid: str
    kind: str
    expires: float


class UserService:
    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self.sessions = sessions
        self._tickets: dict[str, _Ticket] = {}

    # -- users ----------------------------------------------------------------

    async def ensure_admin(self) -> str | None:
        """At the very first start: create `admin` and return its new password."""
        async with self.sessions() as session:
            if await session.scalar(select(func.count()).select_from(User)):
                return None
        password = secrets.token_urlsafe(12)
        try:
            await self.add(ADMIN, password)
        except Conflict:  # another host of a shared database made it meanwhile
            return None
        return password

    async def list(self) -> list[User]:
        async with self.sessions() as session:
            return list(await session.scalars(select(User).order_by(User.name)))

    async def add(self, name: str, password: str) -> User:
        check_user_name(name)
        check_password(password)
        hashed = await asyncio.to_thread(hash_password, password)
        async with self.sessions() as session:
            if await session.scalar(select(User).where(User.name == name)) is not None:
                raise Conflict(f"user {name} exists")
            user = User(name=name, password_hash=hashed)
            session.add(user)
            try:
                await session.commit()
            except IntegrityError:  # added at the same moment by another request
                raise Conflict(f"user {name} exists") from None
            return user

    async def set_password(self, name: str, password: str) -> None:
        """A new password also ends every session the user has open."""
        check_password(password)
        hashed = await asyncio.to_thread(hash_password, password)
        async with self.sessions() as session:
            user = await self._find(session, name)
            user.password_hash = hashed
            user.password_changed_at = utcnow()
            await session.execute(delete(LoginSession).where(LoginSession.user_id == user.id))
            await session.commit()

    async def delete(self, name: str) -> None:
        async with self.sessions() as session:
            user = await self._find(session, name)
            if await session.scalar(select(func.count()).select_from(User)) == 1:
                raise Conflict(f"user {name} is the last user; add another one first")
            await session.delete(user)
            await session.commit()

    @staticmethod
    async def _find(session: Any, name: str) -> User:
        user: User | None = await session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user

    # -- sessions -------------------------------------------------------------

    async def login(self, name: str, password: str) -> tuple[str, Login] | None:
        """A new session's cookie and who it is, or None for wrong credentials."""
        async with self.sessions() as session:
            user = await session.scalar(select(User).where(User.name == name))
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, password[:MAX_PASSWORD], stored)
        if user is None or not ok:
            return None
        cookie = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.sessions() as session:
            await session.execute(delete(LoginSession).where(LoginSession.expires_at < now))
            session.add(
                LoginSession(
                    id=_session_key(cookie),
                    user_id=user.id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + SESSION_LIFETIME,
                )
            )
            await session.commit()
        return cookie, Login(user=user.name, via="session", csrf_token=csrf)

    async def session_login(self, cookie: str) -> Login | None:
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(User.name, LoginSession.csrf_token, LoginSession.expires_at)
                    .join(User, User.id == LoginSession.user_id)
                    .where(LoginSession.id == _session_key(cookie))
                )
            ).one_or_none()
        if row is None:
            return None
        if row.expires_at < utcnow():
            return None
        return Login(user=row.name, via="session", csrf_token=row.csrf_token)

    async def logout(self, cookie: str) -> None:
        async with self.sessions() as session:
            await session.execute(
                delete(LoginSession).where(LoginSession.id == _session_key(cookie))
            )
            await session.commit()

    # -- console tickets ------------------------------------------------------

    def issue_ticket(self, user: str, vm_uuid: str, kind: str) -> str:
        if kind not in TICKET_KINDS:
            raise InvalidRequest(f"console kind must be one of {', '.join(TICKET_KINDS)}")
        now = time.monotonic()
        for key in [k for k, t in self._tickets.items() if t.expires < now]:
            del self._tickets[key]
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = _Ticket(user, vm_uuid, kind, now + TICKET_LIFETIME)
        return ticket

    def take_ticket(self, ticket: str, vm_uuid: str, kind: str) -> str | None:
        """The ticket's user if it is valid for this VM and console; used up either way."""
        found = self._tickets.pop(ticket, None)
        if found is None or found.expires < time.monotonic():
            return None
        if found.vm_uuid != vm_uuid or found.kind != kind:
            return None
        return found.user
