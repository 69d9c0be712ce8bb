"""Web UI authentication over the in-memory driver: logins, sessions, CSRF, users,
console tickets, live events, uploads. (Consoles over real sockets and a real
browser: tests/functional/test_web_api.py and tests/e2e.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.fakehive import Client, fake_hive
from vmhive.api import routes_uploads
from vmhive.events import EventBus
from vmhive.services.users import UserService, hash_password, verify_password

PASSWORD = "correct horse battery"


@pytest.fixture
async def browser(tmp_path: Path, hive_db_url: str | None) -> AsyncIterator[Client]:
    """A client with no bearer token: what a browser is."""
    async with fake_hive(tmp_path, "vha", token=False, db_url=hive_db_url) as hive:
        await hive.daemon.users.set_password("admin", PASSWORD)
        yield hive


async def login(client: Client, password: str = PASSWORD) -> str:
    response = await client.call(
        "POST", "/api/auth/login", json={"username": "admin", "password": password}
    )
    assert response.status_code == 200, response.text
    csrf: str = response.json()["csrf_token"]
    return csrf


def test_password_hashes_are_salted_and_verify() -> None:
    one, two = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert one != two and one.startswith("scrypt$")
    assert verify_password("s3cret-pass", one)
    assert not verify_password("s3cret-pasS", one)
    assert not verify_password("s3cret-pass", "garbage")


async def test_first_start_creates_admin_once(tmp_path: Path, hive_db_url: str | None) -> None:
    async with fake_hive(tmp_path, "vhb", db_url=hive_db_url) as hive:
        users = UserService(hive.daemon.sessions)
        assert await users.ensure_admin() is None  # the daemon's start made it already
        assert [u.name for u in await users.list()] == ["admin"]


async def test_requests_without_credentials_are_refused(browser: Client) -> None:
    response = await browser.call("GET", "/api/vms")
    assert response.status_code == 401
    assert "log in" in response.json()["detail"]
    assert (await browser.call("GET", "/api/auth/me")).status_code == 401
    wrong = await browser.call("GET", "/api/vms", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


async def test_wrong_password_is_refused_with_a_message(browser: Client) -> None:
    for name, password in (("admin", "wrong-password"), ("nobody", PASSWORD)):
        response = await browser.call(
            "POST", "/api/auth/login", json={"username": name, "password": password}
        )
        assert response.status_code == 401
        assert response.json()["detail"] == "wrong user name or password"
        assert "set-cookie" not in response.headers


async def test_login_sets_a_strict_httponly_cookie_and_session_works(browser: Client) -> None:
    response = await browser.call(
        "POST", "/api/auth/login", json={"username": "admin", "password": PASSWORD}
    )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert (await browser.call("GET", "/api/vms")).status_code == 200
    me = (await browser.call("GET", "/api/auth/me")).json()
    assert me["user"] == "admin" and me["csrf_token"] == response.json()["csrf_token"]


async def test_state_changes_need_the_csrf_token(browser: Client) -> None:
    csrf = await login(browser)
    body = {"name": "csrf", "generation": 1, "memory_mib": 64, "nic": False}
    refused = await browser.call("POST", "/api/vms", json=body)
    assert refused.status_code == 403
    assert refused.json()["detail"] == "missing or wrong CSRF token"
    wrong = await browser.call("POST", "/api/vms", json=body, headers={"X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    assert (await browser.call("GET", "/api/vms")).json() == []  # nothing was created
    made = await browser.call(
        "POST", "/api/vms", json=body, params={"wait": "true"}, headers={"X-CSRF-Token": csrf}
    )
    assert made.status_code == 200 and made.json()["state"] == "succeeded"


async def test_logout_ends_the_session(browser: Client) -> None:
    csrf = await login(browser)
    stolen = browser.http.cookies.get("vmhive_session")
    response = await browser.call("POST", "/api/auth/logout", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 204
    browser.http.cookies.set("vmhive_session", stolen or "")
    assert (await browser.call("GET", "/api/vms")).status_code == 401


async def test_a_new_password_ends_open_sessions(browser: Client) -> None:
    await login(browser)
    await browser.daemon.users.set_password("admin", "another password")
    assert (await browser.call("GET", "/api/vms")).status_code == 401
    await login(browser, "another password")


async def test_user_management_validates(tmp_path: Path, hive_db_url: str | None) -> None:
    async with fake_hive(tmp_path, "vhc", db_url=hive_db_url) as api:
        short = await api.call("POST", "/api/users", json={"name": "bob", "password": "short"})
        assert short.status_code == 422 and "8 to 1024" in short.json()["detail"]
        bad = await api.call("POST", "/api/users", json={"name": "Bob!", "password": PASSWORD})
        assert bad.status_code == 422 and "bad user name" in bad.json()["detail"]
        ok = await api.call("POST", "/api/users", json={"name": "bob", "password": PASSWORD})
        assert ok.status_code == 201
        dup = await api.call("POST", "/api/users", json={"name": "bob", "password": PASSWORD})
        assert dup.status_code == 409
        assert [u["name"] for u in (await api.call("GET", "/api/users")).json()] == [
            "admin",
            "bob",
        ]
        assert (await api.call("DELETE", "/api/users/admin")).status_code == 204
        last = await api.call("DELETE", "/api/users/bob")
        assert last.status_code == 409 and "last user" in last.json()["detail"]
        missing = await api.call("PUT", "/api/users/zed/password", json={"password": PASSWORD})
        assert missing.status_code == 404


async def test_public_paths_and_security_headers(browser: Client) -> None:
    login_page = await browser.call("GET", "/")
    assert login_page.status_code == 200
    assert "script-src 'self'" in login_page.headers["content-security-policy"]
    assert login_page.headers["x-frame-options"] == "DENY"
    api = await browser.call("GET", "/api/auth/me")
    assert api.headers["x-content-type-options"] == "nosniff"


async def test_console_tickets_are_single_use_and_bound(browser: Client) -> None:
    csrf = await login(browser)
    headers = {"X-CSRF-Token": csrf}
    body = {"name": "tk", "generation": 1, "memory_mib": 64, "nic": False}
    await browser.call("POST", "/api/vms", json=body, params={"wait": "true"}, headers=headers)
    stopped = await browser.call(
        "POST", "/api/vms/tk/console/ticket", json={"kind": "vnc"}, headers=headers
    )
    assert stopped.status_code == 409 and "not running" in stopped.json()["detail"]
    await browser.call("POST", "/api/vms/tk/start", params={"wait": "true"}, headers=headers)
    no_csrf = await browser.call("POST", "/api/vms/tk/console/ticket", json={"kind": "vnc"})
    assert no_csrf.status_code == 403
    bad_kind = await browser.call(
        "POST", "/api/vms/tk/console/ticket", json={"kind": "ssh"}, headers=headers
    )
    assert bad_kind.status_code == 422
    issued = await browser.call(
        "POST", "/api/vms/tk/console/ticket", json={"kind": "vnc"}, headers=headers
    )
    ticket = issued.json()["ticket"]
    users = browser.daemon.users
    vm = await browser.vm("tk")
    assert users.take_ticket(ticket, vm["uuid"], "serial") is None  # wrong kind: used up
    issued = await browser.call(
        "POST", "/api/vms/tk/console/ticket", json={"kind": "serial"}, headers=headers
    )
    ticket = issued.json()["ticket"]
    assert users.take_ticket(ticket, vm["uuid"], "serial") == "admin"
    assert users.take_ticket(ticket, vm["uuid"], "serial") is None  # single use


async def test_event_bus_drops_a_stalled_subscriber() -> None:
    bus = EventBus()
    fast, slow = bus.subscribe(), bus.subscribe()
    for n in range(EventBus.MAX_QUEUED + 5):
        bus.publish("vm", {"n": n})
        if not fast.empty():
            fast.get_nowait()
    assert slow.qsize() == EventBus.MAX_QUEUED + 1
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert items[-1] == ("overflow", {})
    bus.publish("vm", {"n": -1})
    assert slow.empty() and fast.get_nowait() == ("vm", {"n": -1})


async def test_state_changes_are_published(tmp_path: Path, hive_db_url: str | None) -> None:
    async with fake_hive(tmp_path, "vhe", db_url=hive_db_url) as api:
        queue = api.daemon.ctx.events.subscribe()
        body = {"name": "ev", "generation": 1, "memory_mib": 64, "nic": False, "start": True}
        await api.ok("POST", "/api/vms", json=body)
        seen: list[str] = []
        while "running" not in seen:
            kind, data = await asyncio.wait_for(queue.get(), 5)
            assert kind == "vm" and data["name"] == "ev"
            seen.append(data["state"])
        await api.ok("POST", "/api/vms/ev/force-stop")
        await api.ok("DELETE", "/api/vms/ev")
        while True:
            kind, data = await asyncio.wait_for(queue.get(), 5)
            if data.get("deleted"):
                break


async def test_upload_imports_the_body_and_leaves_nothing(
    tmp_path: Path, hive_db_url: str | None
) -> None:
    async with fake_hive(tmp_path, "vhd", db_url=hive_db_url) as api:
        uploads = routes_uploads.uploads_dir(api.daemon.settings.data_dir)
        junk = await api.call("PUT", "/api/isos/junk.iso/upload", content=b"not an iso" * 100)
        assert junk.status_code == 422 and "ISO 9660" in junk.json()["detail"]
        assert list(uploads.iterdir()) == []
        bad = await api.call("PUT", "/api/isos/..%2Fx/upload", content=b"x")
        assert bad.status_code in (404, 422)
        iso = bytearray(64 * 1024)
        iso[0x8001:0x8006] = b"CD001"
        job = await api.ok("PUT", "/api/isos/up.iso/upload", content=bytes(iso))
        assert job["result"]["iso"] == "up.iso"
        names = [i["name"] for i in (await api.call("GET", "/api/isos")).json()]
        assert "up.iso" in names
        for _ in range(50):  # the upload goes once the job has ended
            if not any(uploads.iterdir()):
                break
            await asyncio.sleep(0.02)
        assert list(uploads.iterdir()) == []
