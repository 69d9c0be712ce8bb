"""Database URLs as users write them (`--db`), mapped to the drivers vmhive uses.

Kept free of SQLAlchemy so the settings can check a URL cheaply.
"""

from __future__ import annotations

import re

# What a user may write -> the async driver the daemon runs on.
DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
_PASSWORD = re.compile(r"^([^:/?#]+://[^:/?#@]*):[^@/?#]*@")


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs.

    >>> redact("postgresql://vmhive:s3cret@db.example/vmhive")
    'postgresql://vmhive:***@db.example/vmhive'
    """
    return _PASSWORD.sub(r"\1:***@", url)


def normalize_db_url(url: str) -> str:
    """The async-driver form of a `--db` URL; ValueError (one line) if unsupported.

    >>> normalize_db_url("postgres://vmhive@db.example/vmhive")
    'postgresql+asyncpg://vmhive@db.example/vmhive'
    >>> normalize_db_url("postgresql://postgres@/vmhive?host=/run/postgresql")
    'postgresql+asyncpg://postgres@/vmhive?host=/run/postgresql'
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ValueError(
            f"--db must be a URL such as postgresql://USER@HOST/DBNAME, got {redact(url)!r}"
        )
    driver = DRIVERS.get(scheme.lower())
    if driver is None:
        raise ValueError(
            f"--db: unsupported database URL scheme {scheme!r}: "
            "use postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME or sqlite:///PATH"
        )
    if driver.startswith("postgresql") and not rest.partition("?")[0].partition("/")[2]:
        raise ValueError(f"--db: the URL names no database: {redact(url)!r}")
    return f"{driver}://{rest}"
