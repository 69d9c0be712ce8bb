"""Unit tests of the QMP facade against the fake QMP server."""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.fake_qmp import (
    BINARY_GARBAGE,
    GARBAGE,
    Close,
    Delay,
    Error,
    Event,
    FakeQmpServer,
    Flood,
    Hang,
    PartialReplyThenClose,
    Raw,
    Return,
)
from vmhive.hypervisor.qemu.qmp import (
    MonitorDisconnected,
    MonitorError,
    MonitorTimeout,
    QmpCommandError,
    QmpMonitor,
    RunStatus,
    VcpuInfo,
)

MakeMonitor = Callable[..., Awaitable[QmpMonitor]]


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of unix socket paths.
    with tempfile.TemporaryDirectory(prefix="vmhq-") as tmp:
        yield Path(tmp) / "qmp.sock"


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Fail a test whose tasks leaked an exception into the event loop."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield errors
    gc.collect()  # "Task exception was never retrieved" is reported on collection
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert errors == []


@pytest.fixture
async def server(sock_path: Path) -> AsyncIterator[FakeQmpServer]:
    async with FakeQmpServer(sock_path) as srv:
        yield srv


@pytest.fixture
async def make_monitor(sock_path: Path) -> AsyncIterator[MakeMonitor]:
    monitors: list[QmpMonitor] = []

    async def make(**kwargs: Any) -> QmpMonitor:
        kwargs.setdefault("command_timeout", 2.0)
        mon = QmpMonitor("unit", **kwargs)
        monitors.append(mon)
        await mon.connect(sock_path, timeout=2.0)
        return mon

    yield make
    for mon in monitors:
        await mon.close()


@pytest.fixture
async def monitor(server: FakeQmpServer, make_monitor: MakeMonitor) -> QmpMonitor:
    return await make_monitor()


# -- normal operation ---------------------------------------------------------


async def test_commands_return_typed_results(monitor: QmpMonitor, server: FakeQmpServer) -> None:
    assert monitor.connected
    assert not monitor.disconnected.is_set()

    assert await monitor.query_status() == RunStatus(status="running", running=True)
    assert await monitor.query_version() == "7.2.0"

    await monitor.stop()
    assert await monitor.query_status() == RunStatus(status="paused", running=False)
    assert (await monitor.wait_event("STOP", timeout=1)).name == "STOP"
    await monitor.cont()
    assert (await monitor.wait_event("RESUME", timeout=1)).name == "RESUME"
    assert (await monitor.query_status()).running

    await monitor.system_reset()
    reset = await monitor.wait_event("RESET", timeout=1)
    assert reset.data == {"guest": False, "reason": "host-qmp-system-reset"}
    await monitor.system_powerdown()
    assert (await monitor.wait_event("POWERDOWN", timeout=1)).name == "POWERDOWN"

    assert await monitor.human_monitor_command("info version") == "fake hmp: info version\r\n"
    # The negotiation happened first, and arguments went through unchanged.
    assert server.received[0] == {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
    hmp = next(m for m in server.received if m["execute"] == "human-monitor-command")
    assert hmp["arguments"] == {"command-line": "info version"}


async def test_query_kvm_and_cpus(monitor: QmpMonitor, server: FakeQmpServer) -> None:
    server.script("query-kvm", Return({"enabled": True, "present": True}))
    props = {"core-id": 0, "thread-id": 0, "socket-id": 0}
    cpus: list[dict[str, Any]] = [
        {
            "cpu-index": 0,
            "qom-path": "/machine/unattached/device[0]",
            "thread-id": 4242,
            "target": "x86_64",
            "props": props,
        },
        {"cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "target": "x86_64"},
    ]
    server.script("query-cpus-fast", Return(cpus))

    assert await monitor.query_kvm() == (True, True)
    assert await monitor.query_cpus_fast() == cpus
    assert await monitor.query_vcpus() == [
        VcpuInfo(0, "/machine/unattached/device[0]", 4242, "x86_64", props),
        VcpuInfo(1, "/machine/unattached/device[1]", None, "x86_64", {}),
    ]


async def test_event_fields_and_timestamp(monitor: QmpMonitor, server: FakeQmpServer) -> None:
    server.script(
        "query-status",
        Event("GUEST_PANICKED", {"action": "pause"}, timestamp=(1_700_000_000, 250_000)),
        Event("STOP", None, timestamp=(-1, -1)),  # QEMU's "clock unavailable"
        Return({"status": "guest-panicked", "running": False}),
    )
    before = time.time()
    assert await monitor.query_status() == RunStatus("guest-panicked", False)
    panic = await monitor.next_event(timeout=1)
    assert panic.name == "GUEST_PANICKED"
    assert panic.data == {"action": "pause"}
    assert panic.timestamp == pytest.approx(1_700_000_000.25)
    stop = await monitor.next_event(timeout=1)
    assert stop.data == {}
    assert stop.timestamp >= before  # fell back to local time
    assert monitor.last_state_event == stop


async def test_unexpected_reply_shape_is_monitor_error(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    server.script("query-status", Return(["not", "a", "dict"]))
    with pytest.raises(MonitorError, match="unexpected reply to 'query-status'") as info:
        await monitor.query_status()
    assert not isinstance(info.value, MonitorDisconnected)
    assert monitor.connected


# -- errors -------------------------------------------------------------------


async def test_error_reply_raises_typed_error(monitor: QmpMonitor, server: FakeQmpServer) -> None:
    server.script("cont", Error("GenericError", "Resetting the Virtual Machine is required"))
    with pytest.raises(QmpCommandError) as info:
        await monitor.cont()
    err = info.value
    assert err.error_class == "GenericError"
    assert err.desc == "Resetting the Virtual Machine is required"
    assert err.command == "cont"
    assert "GenericError" in str(err)
    assert isinstance(err, MonitorError)
    # An error reply is not a connection problem: the monitor keeps working.
    assert monitor.connected
    assert (await monitor.query_status()).status == "running"


@pytest.mark.parametrize(
    ("garbage", "shown"), [(GARBAGE, "this is {not json"), (BINARY_GARBAGE, r"\xff\xfe junk")]
)
async def test_garbage_from_server_is_clear_monitor_error(
    monitor: QmpMonitor,
    server: FakeQmpServer,
    sock_path: Path,
    caplog: pytest.LogCaptureFixture,
    garbage: Raw,
    shown: str,
) -> None:
    caplog.set_level(logging.WARNING)
    server.script("query-status", garbage)
    async with asyncio.timeout(3):
        with pytest.raises(MonitorDisconnected, match="not valid QMP JSON") as info:
            await monitor.query_status()
        await monitor.disconnected.wait()
    assert shown in str(info.value)
    assert not monitor.connected
    assert monitor.disconnect_reason is not None
    # Further commands fail immediately, with the same explanation.
    with pytest.raises(MonitorDisconnected, match="not valid QMP JSON"):
        await monitor.query_version()
    # qemu.qmp's own ERROR lines are demoted; we log one warning of our own.
    assert not [r for r in caplog.records if r.name.startswith("qemu.qmp")]
    ours = [r for r in caplog.records if r.name == "vmhive.hypervisor.qemu.qmp"]
    assert [r.levelno for r in ours] == [logging.WARNING]
    # The event loop is healthy: a fresh monitor can connect and work.
    other = QmpMonitor("other", command_timeout=2)
    await other.connect(sock_path, timeout=2)
    try:
        assert await other.query_version() == "7.2.0"
    finally:
        await other.close()


async def test_garbage_event_between_commands_disconnects(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    waiter = asyncio.create_task(monitor.next_event())
    await asyncio.sleep(0)
    server.script("query-status", Return({"status": "running", "running": True}), Raw(b"[1, 2]\n"))
    assert (await monitor.query_status()).running
    async with asyncio.timeout(3):
        await monitor.disconnected.wait()
        with pytest.raises(MonitorDisconnected):
            await waiter  # a blocked consumer is released, not left hanging
    assert "not a QMP object" in (monitor.disconnect_reason or "")


async def test_garbage_greeting_fails_connect(sock_path: Path) -> None:
    async with FakeQmpServer(sock_path, greeting=b"SSH-2.0-OpenSSH\r\n"):
        mon = QmpMonitor("unit")
        async with asyncio.timeout(3):
            with pytest.raises(MonitorError, match="cannot connect") as info:
                await mon.connect(sock_path, timeout=2)
        assert not isinstance(info.value, MonitorTimeout)
        assert not mon.connected
        assert mon.disconnected.is_set()


async def test_disconnect_mid_reply(monitor: QmpMonitor, server: FakeQmpServer) -> None:
    server.script("query-status", PartialReplyThenClose())
    async with asyncio.timeout(3):
        with pytest.raises(MonitorDisconnected, match="middle of a message"):
            await monitor.query_status()
        await monitor.disconnected.wait()
    assert not monitor.connected
    with pytest.raises(MonitorDisconnected):
        await monitor.next_event(timeout=1)


async def test_server_hangup_sets_disconnected_and_keeps_queued_events(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    await server.emit("RESET")
    await server.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
    await server.drop_client()
    async with asyncio.timeout(3):
        await monitor.disconnected.wait()
    assert monitor.disconnect_reason == "QEMU closed the monitor connection"
    # Events that arrived before the hangup are still delivered, then it ends.
    assert (await monitor.next_event(timeout=1)).name == "RESET"
    assert (await monitor.wait_event("SHUTDOWN", timeout=1)).data["reason"] == "guest-shutdown"
    with pytest.raises(MonitorDisconnected):
        await monitor.next_event(timeout=1)


async def test_command_without_reply_times_out(
    make_monitor: MakeMonitor, server: FakeQmpServer
) -> None:
    monitor = await make_monitor(command_timeout=0.2)
    server.script("query-status", Hang())
    start = time.monotonic()
    with pytest.raises(MonitorTimeout, match="query-status"):
        await monitor.query_status()
    assert 0.15 < time.monotonic() - start < 1.5
    # A timeout is not a disconnect: other commands still work.
    assert monitor.connected
    assert await monitor.query_version() == "7.2.0"


async def test_late_reply_after_timeout_is_not_misrouted(
    make_monitor: MakeMonitor, server: FakeQmpServer
) -> None:
    monitor = await make_monitor(command_timeout=0.1)
    server.script("query-kvm", Delay(0.3), Return({"enabled": True, "present": True}))
    with pytest.raises(MonitorTimeout):
        await monitor.query_kvm()
    # The late query-kvm reply arrives first; it must be dropped, not returned here.
    monitor.command_timeout = 2.0
    assert await monitor.query_version() == "7.2.0"
    assert server.commands()[-2:] == ["query-kvm", "query-version"]


async def test_connect_missing_socket_fails_fast(sock_path: Path) -> None:
    mon = QmpMonitor("unit")
    start = time.monotonic()
    with pytest.raises(MonitorError, match="cannot connect") as info:
        await mon.connect(sock_path, timeout=5)
    assert time.monotonic() - start < 1.0
    assert not isinstance(info.value, MonitorTimeout)
    assert str(sock_path) in str(info.value)
    assert not mon.connected
    with pytest.raises(MonitorDisconnected):
        await mon.query_status()


async def test_connect_refused_on_stale_socket_file(sock_path: Path) -> None:
    async with FakeQmpServer(sock_path):
        pass  # the socket file stays behind, nobody listens
    assert sock_path.exists()
    with pytest.raises(MonitorError, match="cannot connect"):
        await QmpMonitor("unit").connect(sock_path, timeout=5)


async def test_connect_times_out_without_greeting(sock_path: Path) -> None:
    async with FakeQmpServer(sock_path, send_greeting=False):
        mon = QmpMonitor("unit")
        start = time.monotonic()
        with pytest.raises(MonitorTimeout, match="greeting"):
            await mon.connect(sock_path, timeout=0.2)
        assert time.monotonic() - start < 1.5
        assert not mon.connected


async def test_commands_before_negotiation_are_refused_by_fake(sock_path: Path) -> None:
    # Guards the fake itself: it must behave like QEMU before qmp_capabilities.
    async with FakeQmpServer(sock_path) as server:
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        assert b'"QMP"' in await reader.readline()
        writer.write(b'{"execute": "query-status", "id": 1}')
        reply = await reader.readline()
        assert b"Expecting capabilities negotiation" in reply
        assert b'"id": 1' in reply
        writer.close()
        assert server.commands() == ["query-status"]


# -- connection lifecycle -----------------------------------------------------


async def test_close_and_reconnect(
    monitor: QmpMonitor, server: FakeQmpServer, sock_path: Path
) -> None:
    with pytest.raises(MonitorError, match="already connected"):
        await monitor.connect(sock_path)
    await monitor.close()
    assert not monitor.connected
    assert monitor.disconnected.is_set()
    assert monitor.disconnect_reason == "closed by vmhive"
    await monitor.close()  # idempotent
    with pytest.raises(MonitorDisconnected):
        await monitor.query_status()
    with pytest.raises(MonitorDisconnected):
        await monitor.next_event(timeout=5)  # immediately, not after 5 s

    await monitor.connect(sock_path, timeout=2)
    assert monitor.connected
    assert not monitor.disconnected.is_set()
    assert (await monitor.query_status()).running
    assert server.connections == 2


async def test_quit_tolerates_connection_closing(
    monitor: QmpMonitor, server: FakeQmpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await monitor.quit()
    shutdown = await monitor.wait_event("SHUTDOWN", timeout=2)
    assert shutdown.data == {"guest": False, "reason": "host-qmp-quit"}
    async with asyncio.timeout(3):
        await monitor.disconnected.wait()
    assert not caplog.records  # an expected exit is not worth a warning


async def test_quit_when_qemu_hangs_up_before_replying(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    server.script("quit", Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}), Close())
    async with asyncio.timeout(3):
        await monitor.quit()  # no exception although no reply ever came
        await monitor.disconnected.wait()
    assert monitor.last_state_event is not None
    assert monitor.last_state_event.name == "SHUTDOWN"


# -- events -------------------------------------------------------------------


async def test_wait_event_leaves_other_events_in_order(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    server.script(
        "query-status",
        Event("A"),
        Event("B"),
        Event("SHUTDOWN"),
        Event("C"),
        Return({"status": "shutdown", "running": False}),
    )
    await monitor.query_status()
    assert (await monitor.wait_event("SHUTDOWN", timeout=1)).name == "SHUTDOWN"
    assert [(await monitor.next_event(timeout=1)).name for _ in range(3)] == ["A", "B", "C"]
    assert monitor.events_pending() == 0


async def test_wait_event_for_future_event_and_timeout(
    monitor: QmpMonitor, server: FakeQmpServer
) -> None:
    waiter = asyncio.create_task(monitor.wait_event("RESET", timeout=2))
    await asyncio.sleep(0.01)
    await server.emit("OTHER")
    await server.emit("RESET", {"guest": True, "reason": "guest-reset"})
    assert (await waiter).data["reason"] == "guest-reset"
    assert (await monitor.next_event(timeout=1)).name == "OTHER"

    start = time.monotonic()
    with pytest.raises(MonitorTimeout, match="NEVER"):
        await monitor.wait_event("NEVER", timeout=0.1)
    with pytest.raises(MonitorTimeout):
        await monitor.next_event(timeout=0.1)
    assert time.monotonic() - start < 1.0


async def test_event_flood_delivered_in_order_without_loss(
    make_monitor: MakeMonitor, server: FakeQmpServer
) -> None:
    total = 10_000
    monitor = await make_monitor(event_queue_size=64)
    received: list[int] = []
    peak = 0

    async def consume() -> None:
        nonlocal peak
        while len(received) < total:
            peak = max(peak, monitor.events_pending())
            event = await monitor.next_event(timeout=2)
            received.append(event.data["seq"])

    consumer = asyncio.create_task(consume())
    server.script("query-status", Flood(total), Return({"status": "running", "running": True}))
    assert (await monitor.query_status()).running
    async with asyncio.timeout(5):
        await consumer
    assert received == list(range(total))
    assert monitor.events_dropped() == 0
    assert peak <= 64


async def test_event_flood_overflow_drops_oldest_but_keeps_lifecycle(
    make_monitor: MakeMonitor, server: FakeQmpServer, caplog: pytest.LogCaptureFixture
) -> None:
    total, size = 10_000, 100
    monitor = await make_monitor(event_queue_size=size)
    server.script(
        "query-status",
        Flood(total, special={10: "STOP", 5000: "SHUTDOWN"}),
        Return({"status": "shutdown", "running": False}),
    )
    # Nobody reads events; the reply follows the flood, so once it is here all
    # 10,000 events have been through the queue.
    await monitor.query_status()
    assert monitor.events_pending() == size
    assert monitor.events_dropped() == total - size

    events = [await monitor.next_event(timeout=1) for _ in range(size)]
    assert [(e.name, e.data["seq"]) for e in events[:2]] == [("STOP", 10), ("SHUTDOWN", 5000)]
    assert [e.data["seq"] for e in events[2:]] == list(range(total - size + 2, total))
    assert monitor.last_state_event is not None
    assert monitor.last_state_event.data["seq"] == 5000
    # Overflow is reported, but not once per dropped event.
    warnings = [r for r in caplog.records if "event queue full" in r.getMessage()]
    assert 1 <= len(warnings) <= 10


async def test_lifecycle_only_overflow_keeps_newest(
    make_monitor: MakeMonitor, server: FakeQmpServer
) -> None:
    monitor = await make_monitor(event_queue_size=4)
    server.script("query-status", Flood(10, name="RESET"), Return({"status": "running"}))
    await monitor.query_status()
    assert monitor.events_dropped() == 6
    events = [await monitor.next_event(timeout=1) for _ in range(4)]
    assert [e.data["seq"] for e in events] == [6, 7, 8, 9]
    assert monitor.last_state_event == events[-1]


async def test_new_connection_starts_with_empty_queue(
    monitor: QmpMonitor, server: FakeQmpServer, sock_path: Path
) -> None:
    await server.emit("RESET")
    await monitor.wait_event("RESET", timeout=1)
    await server.emit("STOP")
    await asyncio.sleep(0.05)
    assert monitor.events_pending() == 1
    await monitor.close()
    await monitor.connect(sock_path, timeout=2)
    assert monitor.events_pending() == 0
    assert monitor.events_dropped() == 0
    assert monitor.last_state_event is None


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        QmpMonitor("x", event_queue_size=0)
