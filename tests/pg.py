"""A throwaway PostgreSQL server for tests, from Debian's `postgresql` package.

`PgServer.start()` runs `initdb` into a fresh /tmp/vh-pg-* directory and starts
the server listening on a unix socket in that directory only
(listen_addresses=''), with durability off (fsync, synchronous_commit): the data
dies with the test run anyway. As root, initdb and the server run as the
`postgres` OS user (initdb refuses root); clients connect as the database
superuser `postgres` without a password (trust, socket only).

URLs: `postgresql+asyncpg://postgres@/NAME?host=/tmp/vh-pg-xxx` is understood by
asyncpg and, through `vmhive.store.db.sync_url`, by psycopg (libpq's host=DIR).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

START_TIMEOUT = 30  # seconds; pg_ctl -w waits at most this long for the server
PG_ROOT = Path("/usr/lib/postgresql")
PG_OS_USER = "postgres"


class PgUnavailable(Exception):
    """PostgreSQL's server programs are not installed, or the server did not start."""


def pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl."""
    versions = sorted(
        (d for d in PG_ROOT.glob("*/bin") if (d / "initdb").exists() and (d / "pg_ctl").exists()),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    if not versions:
        raise PgUnavailable(
            f"no PostgreSQL server under {PG_ROOT} (scripts/install-deps.sh installs it)"
        )
    return versions[-1]


@dataclass
class PgServer:
    root: Path  # the temp dir: socket, data/ and server.log
    bin_dir: Path
    as_user: str | None  # run server programs via runuser as this user (we are root)
    databases_made: int = field(default=0, init=False)

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def start(cls) -> PgServer:
        bin_dir = pg_bin_dir()
        root = Path(tempfile.mkdtemp(prefix="vh-pg-", dir="/tmp"))
        as_user = PG_OS_USER if os.geteuid() == 0 else None
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server = cls(root, bin_dir, as_user)
        try:
            server._run(
                "initdb",
                "-D",
                str(server.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            options = (
                f"-c listen_addresses='' -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            server._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-D",
                str(server.data_dir),
                "-l",
                str(server.log_file),
                "-o",
                options,
            )
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin_dir / program), *args]
        if self.as_user is not None:
            argv = ["runuser", "-u", self.as_user, "--", *argv]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=START_TIMEOUT + 30, check=False
        )
        if done.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise PgUnavailable(
                f"{program} failed ({done.returncode}): {done.stderr.strip()} {log[-2000:]}"
            )

    def stop(self) -> None:
        """Stop at once (no checkpoint: the data is thrown away) and remove everything."""
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(PgUnavailable, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data_dir))
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://postgres@/{database}?host={self.socket_dir}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        )

    def unique_name(self, prefix: str) -> str:
        self.databases_made += 1
        return f"{prefix}_{self.databases_made}"

    def new_database(self, prefix: str = "db") -> str:
        """A new empty database with a name of its own; returns its asyncpg URL."""
        return self.create_database(self.unique_name(prefix))

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new empty database (or a copy of `template`); returns its asyncpg URL."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(query)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even while clients are still connected (PostgreSQL 13+)."""
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
