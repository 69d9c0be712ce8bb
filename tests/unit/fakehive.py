"""A whole daemon over the in-memory driver, called through its ASGI app.

Shared by the unit tests of the API, snapshots and authentication: the real
services, jobs, database and auth wrapper, with `FakeDriver` instead of QEMU.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from vmhive.api.app import create_app, wrap
from vmhive.config import Settings
from vmhive.daemon import Daemon
from vmhive.hypervisor.fake import FakeDriver


class Client:
    def __init__(self, http: httpx.AsyncClient, daemon: Daemon, driver: FakeDriver) -> None:
        self.http = http
        self.daemon = daemon
        self.driver = driver

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, path, **kwargs)

    async def job(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        params = {**kwargs.pop("params", {}), "wait": "true"}
        response = await self.call(method, path, params=params, **kwargs)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        job = await self.job(method, path, **kwargs)
        assert job["state"] == "succeeded", job
        return job

    async def vm(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = (await self.call("GET", f"/api/vms/{name}")).json()
        return data


@contextlib.asynccontextmanager
async def fake_hive(
    tmp_path: Path,
    prefix: str,
    *,
    token: bool = True,
    schedules: bool = True,
    db_url: str | None = None,
    **settings: Any,
) -> AsyncIterator[Client]:
    """A started daemon; `token`: the client sends the bearer token (an API script);
    `schedules=False`: the snapshot schedules' loop is stopped (tests run passes);
    `db_url`: its database (None: SQLite in the data dir; see `hive_db_url`);
    other keywords are further `Settings` fields (e.g. node_name)."""
    # Unique even across concurrent pytest runs (their tmp_path names repeat), and
    # short, for unix socket paths.
    data = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    settings = Settings(
        data_dir=data,
        db_url=db_url,
        accel="tcg",
        create_demo=False,
        stop_timeout=0.5,
        **settings,
    )
    driver = FakeDriver()
    daemon = Daemon(settings, driver)
    await daemon.start()
    if not schedules:
        await daemon.schedules.stop()
    app = wrap(create_app(daemon), daemon)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {daemon.token}"} if token else {}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as http:
            yield Client(http, daemon, driver)
    finally:
        await daemon.stop()
        shutil.rmtree(data, ignore_errors=True)
