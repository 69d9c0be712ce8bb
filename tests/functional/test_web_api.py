"""The web UI's backend over real TCP with a real daemon and a real guest: login
with the password printed at first start, console tickets, the serial and VNC
websockets, and live events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def web(tiny_image_dir: Path) -> Iterator[tuple[Hive, httpx.Client, str]]:
    """A daemon with a running tiny guest, and a browser-like client logged in."""
    hive = Hive(tiny_image_dir)
    hive.start()
    try:
        match = re.search(r"login: admin / (\S+)", hive.daemon_log())
        assert match, hive.daemon_log()
        client = httpx.Client(base_url=f"http://127.0.0.1:{hive.port}", timeout=30)
        response = client.post(
            "/api/auth/login", json={"username": "admin", "password": match.group(1)}
        )
        assert response.status_code == 200, response.text
        hive.create_tiny("web", 1)
        hive.cli("vm", "start", "web")
        hive.wait_ready("web")
        yield hive, client, response.json()["csrf_token"]
        client.close()
    finally:
        hive.close()


def ticket(client: httpx.Client, csrf: str, kind: str, vm: str = "web") -> str:
    response = client.post(
        f"/api/vms/{vm}/console/ticket", json={"kind": kind}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200, response.text
    value: str = response.json()["ticket"]
    return value


def ws_url(hive: Hive, path: str) -> str:
    return f"ws://127.0.0.1:{hive.port}{path}"


def test_first_start_prints_the_admin_password_once(
    web: tuple[Hive, httpx.Client, str],
) -> None:
    hive, _, _ = web
    assert len(re.findall(r"login: admin / ", hive.daemon_log())) == 1
    hive.stop_daemon()
    hive.start()  # a restart creates no second admin and prints nothing new
    assert len(re.findall(r"login: admin / ", hive.daemon_log())) == 1


def test_serial_console_with_a_ticket_replays_and_runs_commands(
    web: tuple[Hive, httpx.Client, str],
) -> None:
    hive, client, csrf = web

    async def session() -> str:
        url = ws_url(hive, f"/api/vms/web/console?ticket={ticket(client, csrf, 'serial')}")
        seen = b""
        async with connect(url, open_timeout=10) as ws:
            async with asyncio.timeout(30):
                while b"vmhive-guest-ready" not in seen:  # replayed from the log
                    seen += await ws.recv(decode=False)
                await ws.send(b"echo web-$((6*7))\n")
                while b"web-42" not in seen:
                    seen += await ws.recv(decode=False)
        return seen.decode(errors="replace")

    assert "web-42" in asyncio.run(session())


def test_vnc_websocket_speaks_rfb(web: tuple[Hive, httpx.Client, str]) -> None:
    hive, client, csrf = web

    async def greeting() -> tuple[bytes, str | None]:
        url = ws_url(hive, f"/api/vms/web/vnc?ticket={ticket(client, csrf, 'vnc')}")
        async with connect(url, subprotocols=["binary"], open_timeout=10) as ws:  # type: ignore[list-item]
            data = await asyncio.wait_for(ws.recv(decode=False), 10)
            return data, ws.subprotocol

    data, subprotocol = asyncio.run(greeting())
    assert data.startswith(b"RFB 003.") and subprotocol == "binary"


def test_console_sockets_refuse_without_a_valid_ticket(
    web: tuple[Hive, httpx.Client, str],
) -> None:
    hive, client, csrf = web
    cookie = f"vmhive_session={client.cookies.get('vmhive_session')}"

    async def close_code(path: str, headers: dict[str, str] | None = None) -> int | None:
        try:
            async with connect(ws_url(hive, path), additional_headers=headers) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        except Exception as exc:  # refused during the handshake
            return getattr(getattr(exc, "response", None), "status_code", -1)
        return None

    used = ticket(client, csrf, "vnc")

    async def use_once() -> None:
        async with connect(ws_url(hive, f"/api/vms/web/vnc?ticket={used}")) as ws:
            await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(use_once())
    serial_ticket = ticket(client, csrf, "serial")

    async def all_codes() -> list[int | None]:
        return await asyncio.wait_for(
            asyncio.gather(
                close_code(f"/api/vms/web/vnc?ticket={used}"),  # used already
                close_code("/api/vms/web/vnc", {"Cookie": cookie}),  # a cookie is not enough
                close_code(f"/api/vms/web/vnc?ticket={serial_ticket}"),  # wrong kind
                close_code("/api/vms/web/console?ticket=made-up"),
            ),
            30,
        )

    codes = asyncio.run(all_codes())
    assert all(code in (4401, 403) for code in codes), codes


def test_events_stream_vm_states_and_jobs(web: tuple[Hive, httpx.Client, str]) -> None:
    hive, client, csrf = web
    hive.create_tiny("ev", 1)
    hive.cli("vm", "start", "ev")
    seen: list[tuple[str, dict[str, object]]] = []
    with client.stream("GET", "/api/events", timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        started = client.post(
            "/api/vms/ev/force-stop", headers={"X-CSRF-Token": csrf}
        )  # a job, and a state change to stopped
        assert started.status_code == 202, started.text
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[6:])))
                states = {d.get("state") for k, d in seen if k == "vm" and d.get("name") == "ev"}
                jobs = {
                    d.get("state")
                    for k, d in seen
                    if k == "job" and (d.get("params") or {}).get("name") == "ev"  # type: ignore[attr-defined]
                }
                if "stopped" in states and "succeeded" in jobs:
                    break
    kinds = {k for k, _ in seen}
    assert {"vm", "job"} <= kinds


def test_user_cli_adds_logins_and_passwd_ends_sessions(
    web: tuple[Hive, httpx.Client, str],
) -> None:
    hive, _, _ = web
    hive.cli("user", "add", "carol", "--password-stdin", input="carol-password-1\n")
    assert "carol" in hive.cli("user", "list").out
    short = hive.cli("user", "add", "dave", "--password-stdin", input="short\n", check=False)
    assert short.rc != 0 and "8 to 1024" in short.err and len(short.err.strip().splitlines()) == 1
    with httpx.Client(base_url=f"http://127.0.0.1:{hive.port}", timeout=30) as carol:
        body = {"username": "carol", "password": "carol-password-1"}
        assert carol.post("/api/auth/login", json=body).status_code == 200
        assert carol.get("/api/vms").status_code == 200
        hive.cli("user", "passwd", "carol", "--password-stdin", input="carol-password-2\n")
        assert carol.get("/api/vms").status_code == 401
    hive.cli("user", "delete", "carol")
    assert "carol" not in hive.cli("user", "list").out
