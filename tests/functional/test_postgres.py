"""`vmhive serve --db postgresql://...`: a real daemon keeping its state in PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.functional.hive import Hive
from tests.pg import PgServer

pytestmark = pytest.mark.functional


def test_a_vm_lives_its_life_on_postgresql(tiny_image_dir: Path, postgres_server: PgServer) -> None:
    database = postgres_server.unique_name("serve")
    postgres_server.create_database(database)
    # The short scheme a user writes; the daemon picks the asyncpg driver itself.
    url = postgres_server.url(database, driver="postgres")
    hive = Hive(tiny_image_dir, "--db", url)

    def rows(query: str) -> list[tuple[object, ...]]:
        with psycopg.connect(
            host=str(postgres_server.socket_dir), user="postgres", dbname=database
        ) as conn:
            return conn.execute(query).fetchall()

    try:
        hive.start()
        assert not (hive.data_dir / "vmhive.db").exists()  # no SQLite next to it
        hive.create_tiny("pg-vm", 1)
        hive.cli("vm", "start", "pg-vm")
        hive.wait_ready("pg-vm")
        assert rows("SELECT name, state, desired_state FROM vms") == [
            ("pg-vm", "running", "running")
        ]

        # The state outlives the daemon: a restart re-adopts the running guest.
        hive.stop_daemon()
        hive.start()
        assert hive.wait_state("pg-vm", "running")["pid"]
        hive.cli("vm", "force-stop", "pg-vm")
        assert hive.vm("pg-vm")["state"] == "stopped"
        hive.cli("vm", "delete", "pg-vm")
        assert rows("SELECT name FROM vms") == []
        kinds = rows("SELECT kind, state FROM jobs ORDER BY created_at")
        assert [k for k, _ in kinds][-4:] == ["vm.create", "vm.start", "vm.force-stop", "vm.delete"]
        assert {s for _, s in kinds} == {"succeeded"}
    except BaseException:
        print(hive.daemon_log()[-5000:])  # shown with the failure
        raise
    finally:
        hive.close()
