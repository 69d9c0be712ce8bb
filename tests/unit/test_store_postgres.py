"""The store on PostgreSQL: migrations, URLs, and what differs from SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.pg import PgServer
from tests.unit.fakehive import Client, fake_hive
from vmhive.jobs.runner import JobContext, JobRunner
from vmhive.store import db, urls
from vmhive.store.models import Base, Event, Job, Setting, User

BLANK = {"name": "web", "generation": 1, "memory_mib": 64, "disks": [{"size": "16M"}]}


def _head() -> str | None:
    return ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()


@pytest.fixture
async def engine(postgres_server: PgServer) -> AsyncIterator[AsyncEngine]:
    url = postgres_server.new_database("store")
    await asyncio.to_thread(db.migrate, url)
    engine = db.make_engine(url)
    yield engine
    await engine.dispose()


async def test_migrations_reach_head_with_every_table(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        version = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
        tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        columns = await conn.run_sync(
            lambda c: {
                (table, col["name"]): col["type"]
                for table in ("jobs", "networks", "users")
                for col in sa.inspect(c).get_columns(table)
            }
        )
    assert version == _head()
    assert set(Base.metadata.tables) <= tables
    # Lengths PostgreSQL enforces (SQLite does not) fit what the API accepts.
    target, network_name = columns[("jobs", "target")], columns[("networks", "name")]
    assert isinstance(target, sa.String) and target.length == 255
    assert isinstance(network_name, sa.String) and network_name.length == 63
    assert isinstance(columns[("jobs", "created_at")], sa.TIMESTAMP)
    assert columns[("jobs", "created_at")].timezone


def test_migrations_run_once_when_daemons_start_together(postgres_server: PgServer) -> None:
    """Two hosts starting against a fresh cluster database: one migrates, one waits."""
    url = postgres_server.new_database("race")
    # Processes, as hosts are: Alembic's `context` is one per process.
    code = "import sys; from vmhive.store import db; db.migrate(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    sync = sa.create_engine(db.sync_url(url))
    with sync.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1
    sync.dispose()


async def test_long_names_fit_their_columns(engine: AsyncEngine) -> None:
    """A 128-character ISO name makes the longest job target; PostgreSQL refuses
    values longer than a column (SQLite stores anything)."""
    runner = JobRunner(db.make_sessionmaker(engine))

    async def work(ctx: JobContext) -> None:
        await ctx.log("ok")

    job_id = await runner.submit("iso.import", "iso:" + "i" * 128, work)
    await runner.wait(job_id, 10)
    assert (await runner.get(job_id)).state == "succeeded"
    await runner.shutdown()


async def test_times_come_back_aware_in_utc(engine: AsyncEngine) -> None:
    at = datetime(2026, 11, 28, 15, 0, tzinfo=timezone(timedelta(hours=2)))
    sessions = db.make_sessionmaker(engine)
    async with sessions() as session:
        session.add(Job(id="j1", kind="k", state="queued", progress=0, params={}, created_at=at))
        await session.commit()
    async with sessions() as session:
        job = await session.get(Job, "j1")
        assert job is not None
        assert job.created_at == at and job.created_at.tzinfo == UTC
        assert job.created_at.hour == 13


async def test_api_times_carry_their_zone_on_both_stores(
    tmp_path: Path, hive_db_url: str | None
) -> None:
    async with fake_hive(tmp_path, "vhp", db_url=hive_db_url) as hive:
        job = await hive.ok("POST", "/api/vms", json=BLANK)
        vm = await hive.vm("web")
        for stamp in (job["created_at"], job["finished_at"], vm["created_at"]):
            assert stamp.endswith("Z"), stamp  # a browser reads a zoneless time as local


async def test_concurrent_state_records_make_one_event(
    tmp_path: Path, hive_db_url: str | None
) -> None:
    """record_state's conditional UPDATE ... RETURNING: of many writers of the same
    state, exactly one sees the change (PostgreSQL re-checks the WHERE on the row
    version it waited for)."""
    async with fake_hive(tmp_path, "vhr", db_url=hive_db_url) as hive:
        await hive.ok("POST", "/api/vms", json=BLANK)
        vm_uuid = (await hive.vm("web"))["uuid"]
        ctx = hive.daemon.ctx
        for state in ("paused", "crashed", "stopped"):
            await asyncio.gather(*(ctx.record_state(vm_uuid, state, "test") for _ in range(8)))
        async with ctx.sessions() as session:
            messages = list(
                await session.scalars(
                    sa.select(Event.message)
                    .where(Event.vm_uuid == vm_uuid, Event.kind == "state")
                    .order_by(Event.id)
                )
            )
        assert messages[-3:] == ["web: paused (test)", "web: crashed (test)", "web: stopped (test)"]
        assert len([m for m in messages if m.startswith("web: paused")]) == 1


def test_db_urls_are_normalised_or_refused() -> None:
    assert doctest.testmod(urls).failed == 0
    assert urls.normalize_db_url("postgresql://a@h/d") == "postgresql+asyncpg://a@h/d"
    assert urls.normalize_db_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    for bad, words in [
        ("mysql://root@h/d", "unsupported database URL scheme 'mysql'"),
        ("postgresql://h", "names no database"),
        ("db.example", "must be a URL"),
    ]:
        with pytest.raises(ValueError, match=words):
            urls.normalize_db_url(bad)
    with pytest.raises(ValueError) as refused:
        urls.normalize_db_url("mysql://root:hunter2@h/d")
    assert "hunter2" not in str(refused.value)


def test_an_unreachable_database_is_one_line(postgres_server: PgServer) -> None:
    missing = postgres_server.url("no_such_database")
    with pytest.raises(db.DatabaseUnavailable) as refused:
        db.migrate(missing)
    message = str(refused.value)
    assert "\n" not in message and '"no_such_database" does not exist' in message
    nowhere = "postgresql+asyncpg://vmhive:secret@/x?host=/tmp/vh-no-such-dir"
    with pytest.raises(db.DatabaseUnavailable) as refused:
        db.migrate(nowhere)
    assert "\n" not in str(refused.value) and "secret" not in str(refused.value)


async def test_client_fixture_works_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    """The session-wide `postgres_url` fixture the cluster tests share."""
    async with fake_hive(tmp_path, "vhq", db_url=postgres_url) as hive:
        assert isinstance(hive, Client)
        assert hive.daemon.engine.dialect.name == "postgresql"


async def test_hosts_first_starting_together_share_one_setup(
    tmp_path: Path, postgres_server: PgServer
) -> None:
    """Two daemons on one fresh database at the same moment: both start, and what
    is made once per database (admin user, pinned machine types, the demo mark)
    exists once."""
    url = postgres_server.new_database("together")
    async with contextlib.AsyncExitStack() as stack:
        hives = await asyncio.gather(
            *(
                stack.enter_async_context(fake_hive(tmp_path, p, db_url=url, node_name=p))
                for p in "xy"
            )
        )

        async def mark(hive: Client) -> bool:
            async with hive.daemon.sessions() as session:
                made = await db.insert_if_absent(session, Setting, key="test.once", value="1")
                await session.commit()
                return made

        assert sorted(await asyncio.gather(*(mark(hive) for hive in hives * 3))) == [
            False,
            False,
            False,
            False,
            False,
            True,
        ]
        async with hives[0].daemon.sessions() as session:
            users = list(await session.scalars(sa.select(User.name)))
            rows = await session.execute(sa.select(Setting.key, Setting.value))
            settings = {key: value for key, value in rows}
        assert users == ["admin"]
        assert hives[0].daemon.host.machines == hives[1].daemon.host.machines
        assert settings["machine.gen2"] == hives[1].daemon.host.machines[2]
