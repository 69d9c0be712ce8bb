"""Database engine, sessions and migrations.

SQLite (aiosqlite) by default; PostgreSQL (asyncpg) with `--db postgresql://...`.
Migrations run with the synchronous drivers (sqlite3, psycopg), as Alembic needs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from vmhive.store.urls import redact

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT = 10  # seconds, for PostgreSQL: an unreachable host fails start-up soon
# Alembic's `context` is one per process: migrations in threads must take turns.
_migrating = threading.Lock()


class DatabaseUnavailable(Exception):
    """The database cannot be reached or used; the message is one line."""


def sync_url(url: str) -> str:
    """The synchronous-driver form of an async URL, for Alembic."""
    parsed = make_url(url)
    driver = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}.get(
        parsed.drivername, parsed.drivername
    )
    parsed = parsed.set(drivername=driver)
    if driver == "postgresql+psycopg" and "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT)})
    return parsed.render_as_string(hide_password=False)


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent; on PostgreSQL several
    daemons starting at once take turns, see migrations/env.py).

    Raises DatabaseUnavailable when the database cannot be connected to.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    try:
        with _migrating:
            command.upgrade(cfg, "head")
    except exc.OperationalError as error:
        raise DatabaseUnavailable(
            f"cannot use the database {redact(url)}: {_first_line(error.orig or error)}"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> AsyncEngine:
    if make_url(url).get_backend_name() == "postgresql":
        # A server restart or failover leaves dead pooled connections behind:
        # check each one before use instead of failing the request that gets it.
        return create_async_engine(
            url, pool_pre_ping=True, connect_args={"timeout": CONNECT_TIMEOUT}
        )
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def insert_if_absent(session: AsyncSession, model: type[Any], **values: Any) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING: True if this call made the row.

    For rows that several daemons may create at once on a shared database (the
    first start of a cluster): a read-then-insert would fail on the loser's
    unique constraint. The caller commits.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result: Any = await session.execute(insert(model).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount == 1)
