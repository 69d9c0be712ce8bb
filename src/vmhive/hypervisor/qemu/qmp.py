"""A thin, typed, async facade over `qemu.qmp` for one QEMU monitor socket.

`QmpMonitor` is the only thing in vmhive that talks QMP. Everything above it
calls typed methods (`query_status`, `stop`, `quit`, ...) and gets typed
results and typed exceptions; nobody else builds raw QMP dicts.

Error model
-----------
Every library-level failure is translated into one of:

* `QmpCommandError` -- QEMU understood the command and replied with an error;
  the connection is still fine.
* `MonitorTimeout` -- no reply (or no greeting) within the deadline. After a
  command timeout the connection stays up: replies are correlated by id, so a
  late reply is discarded and later commands are unaffected.
* `MonitorDisconnected` -- the connection is gone (EOF, reset, garbage from
  the server, a reply cut off mid-message, or `close()`). `disconnected` is set.
* `MonitorError` -- the base class; also used for connect failures and replies
  that do not have the expected shape.

`qemu.qmp` cannot resynchronise after non-JSON input: its reader task dies and
the session is torn down. We surface that as `MonitorDisconnected` with a
description of what was received, never as a hang.

Event queue policy
------------------
QMP events are pushed by QEMU at any time. They are kept in a bounded FIFO of
``event_queue_size`` entries, read with `next_event` / `wait_event`:

* Delivery is in arrival order. The reader yields to the event loop after each
  event, so a consumer that awaits `next_event` keeps pace even with a burst
  of thousands of events and nothing is dropped.
* When the queue is full, the *oldest ordinary* event is dropped to make room
  and `events_dropped()` is incremented. The incoming event is always kept.
* Lifecycle events (`LIFECYCLE_EVENTS`: SHUTDOWN, STOP, RESUME, RESET, ...)
  are never evicted while an ordinary event can be evicted instead. Only if
  the whole queue consists of lifecycle events (a reset storm with nobody
  reading) is the oldest lifecycle event dropped, also counted. The latest
  lifecycle event ever seen is additionally kept in `last_state_event`, so
  the most recent state change can never be lost; `query_status()` is the
  authority for reconciliation.
* Memory is therefore bounded by ``event_queue_size`` events. `qemu.qmp`'s own
  default `EventListener` (unbounded queue *and* unbounded history) is
  bypassed: our client subclass routes events straight into the bounded queue.
* The queue belongs to one connection: `connect()` starts with an empty queue.
  Events already queued stay readable after a disconnect (so a SHUTDOWN that
  arrived just before QEMU exited is not lost); once the queue is empty,
  `next_event` raises `MonitorDisconnected` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import DeserializationError, Message, UnexpectedTypeError

__all__ = [
    "LIFECYCLE_EVENTS",
    "MonitorDisconnected",
    "MonitorError",
    "MonitorTimeout",
    "QmpCommandError",
    "QmpEvent",
    "QmpMonitor",
    "RunStatus",
    "VcpuInfo",
]

log = logging.getLogger(__name__)

#: Events that describe a change of the VM's run state. These are protected
#: by the event-queue policy (see the module docstring).
LIFECYCLE_EVENTS: frozenset[str] = frozenset(
    {
        "SHUTDOWN",
        "POWERDOWN",
        "RESET",
        "STOP",
        "RESUME",
        "SUSPEND",
        "SUSPEND_DISK",
        "WAKEUP",
        "GUEST_PANICKED",
        "GUEST_CRASHLOADED",
    }
)

# How long we wait for the library to finish tearing down a dead session, so
# that exceptions and `disconnect_reason` can say *why* it died.
_REASON_GRACE = 2.0


# --------------------------------------------------------------------------
# Public data types and exceptions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpEvent:
    """One asynchronous QMP event."""

    name: str  # e.g. "SHUTDOWN", "STOP", "RESUME", "RESET", "POWERDOWN"
    data: dict[str, Any]
    timestamp: float  # seconds since the epoch, from QEMU's timestamp

    @property
    def is_lifecycle(self) -> bool:
        return self.name in LIFECYCLE_EVENTS


@dataclass(frozen=True)
class RunStatus:
    """The reply of ``query-status``."""

    status: str  # QEMU RunState: "running", "paused", "shutdown", "prelaunch", ...
    running: bool


@dataclass(frozen=True)
class VcpuInfo:
    """One entry of ``query-cpus-fast``, typed."""

    cpu_index: int
    qom_path: str
    thread_id: int | None  # host thread id of the vCPU (None if QEMU did not say)
    target: str
    props: dict[str, Any] = field(default_factory=dict)


class MonitorError(Exception):
    """A connection-level problem with the QMP monitor."""


class MonitorTimeout(MonitorError):
    """No reply (or greeting, or event) arrived within the deadline."""


class MonitorDisconnected(MonitorError):
    """The monitor connection is closed or was lost."""


class QmpCommandError(MonitorError):
    """QEMU executed the command and replied with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command '{command}' failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


# --------------------------------------------------------------------------
# Library plumbing
# --------------------------------------------------------------------------


class _QuietLibraryLogs(logging.Filter):
    """Demote qemu.qmp's ERROR/WARNING records to DEBUG.

    qemu.qmp logs every failure it also raises (a missing socket, EOF, bad
    JSON, a late reply to a timed-out command) at ERROR or WARNING. We turn
    each of those into a typed exception and log once ourselves at the right
    level, so the library's copies are only useful when debugging. A record
    is kept only if DEBUG is enabled for its logger; CRITICAL (a library bug)
    passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        if record.levelno > logging.DEBUG:
            record.levelno = logging.DEBUG
            record.levelname = logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_LIB_FILTER = _QuietLibraryLogs()


class _Client(QMPClient):
    """A `QMPClient` whose events go straight into the monitor's bounded queue.

    The stock client feeds every event to its default `EventListener`, which
    keeps an unbounded queue and an unbounded history and cannot be removed.
    Overriding `_event_dispatch` (the one place the library routes events;
    qemu.qmp is pinned) keeps memory bounded and avoids a pump task.
    """

    def __init__(self, name: str, monitor: QmpMonitor) -> None:
        super().__init__(name)
        self._monitor = monitor
        # Every instance logs to 'qemu.qmp.protocol.<name>' (see AsyncProtocol.name).
        lib_logger = self.logger
        if _LIB_FILTER not in lib_logger.filters:
            lib_logger.addFilter(_LIB_FILTER)

    async def _event_dispatch(self, msg: Message) -> None:
        self._monitor._on_event(msg)
        # The reader does not otherwise yield while lines are buffered, so a
        # burst of events would be processed in one go and overflow the queue
        # before any consumer ran. Yielding lets consumers keep pace.
        await asyncio.sleep(0)


def _describe(err: BaseException) -> str:
    """A one-line, human explanation of why the library dropped the session."""
    if isinstance(err, EOFError):
        return "QEMU closed the monitor connection"
    if isinstance(err, DeserializationError):
        raw = err.raw
        if raw and not raw.endswith(b"\n"):
            return f"connection closed in the middle of a message (got {raw[:80]!r})"
        return f"QEMU sent data that is not valid QMP JSON: {raw.rstrip()[:80]!r}"
    if isinstance(err, UnicodeDecodeError):
        # json.loads() sniffs the encoding of bytes input; binary junk can fail
        # decoding before JSON parsing, and qemu.qmp does not wrap that error.
        return f"QEMU sent data that is not valid QMP JSON: {bytes(err.object).rstrip()[:80]!r}"
    if isinstance(err, UnexpectedTypeError):
        return f"QEMU sent JSON that is not a QMP object: {err.value!r:.80}"
    if isinstance(err, ProtocolError):
        return f"QMP protocol error: {err.error_message}"
    if isinstance(err, OSError):
        return f"connection error: {err}"
    return f"{type(err).__name__}: {err}"


def _expect_dict(command: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MonitorError(f"unexpected reply to '{command}': {value!r:.200}")
    return value


def _event_from_message(msg: Message) -> QmpEvent:
    name = msg.get("event")
    data = msg.get("data")
    stamp = msg.get("timestamp")
    timestamp = time.time()
    if isinstance(stamp, dict):
        seconds = stamp.get("seconds")
        micros = stamp.get("microseconds", 0)
        # QEMU sends -1/-1 when it could not read the clock.
        if isinstance(seconds, int) and isinstance(micros, int) and seconds >= 0:
            timestamp = seconds + micros / 1_000_000
    return QmpEvent(
        name=str(name),
        data=dict(data) if isinstance(data, dict) else {},
        timestamp=timestamp,
    )


# --------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------


class QmpMonitor:
    """One QMP connection to one QEMU process.

    Invariant: ``disconnected`` is set whenever there is no live session
    (before the first `connect`, after `close`, after the connection drops)
    and clear while connected.
    """

    def __init__(
        self, name: str, *, command_timeout: float = 10.0, event_queue_size: int = 1024
    ) -> None:
        if event_queue_size < 1:
            raise ValueError("event_queue_size must be at least 1")
        self.name = name or "qmp"
        self.command_timeout = command_timeout
        self.event_queue_size = event_queue_size
        #: Set when the connection drops or is closed (and before connecting).
        self.disconnected = asyncio.Event()
        self.disconnected.set()

        self._client: _Client | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._events: deque[QmpEvent] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._dropped = 0
        self._last_state_event: QmpEvent | None = None
        self._disconnect_reason: str | None = None
        self._closing = False  # close() was called
        self._expect_exit = False  # quit was sent or SHUTDOWN seen: EOF is normal

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<QmpMonitor {self.name!r} {state}>"

    # -- connection ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        client = self._client
        return (
            client is not None
            and client.runstate == Runstate.RUNNING
            and not self.disconnected.is_set()
        )

    @property
    def disconnect_reason(self) -> str | None:
        """Why the last session ended (None while connected or never connected)."""
        return self._disconnect_reason

    async def connect(self, socket_path: Path, *, timeout: float = 5.0) -> None:
        """Connect to QEMU's QMP unix socket and negotiate capabilities.

        Fails fast with `MonitorError` if the socket is missing or refuses the
        connection, and with `MonitorTimeout` if QEMU does not greet and
        negotiate within ``timeout`` seconds. Does not retry: callers that
        race QEMU's start-up poll for the socket themselves.
        """
        if self.connected:
            raise MonitorError(f"monitor {self.name}: already connected")
        if self._client is not None:
            await self.close()  # reap a session that dropped on its own

        self._reset_session()
        client = _Client(self.name, self)
        try:
            async with asyncio.timeout(timeout):
                await client.connect(str(socket_path))
        except TimeoutError:
            raise MonitorTimeout(
                f"monitor {self.name}: no QMP greeting/negotiation on {socket_path} "
                f"within {timeout:g}s"
            ) from None
        except ConnectError as err:
            raise MonitorError(
                f"monitor {self.name}: cannot connect to {socket_path}: {err}"
            ) from err
        except QMPError as err:  # defensive: the library documents only ConnectError
            raise MonitorError(
                f"monitor {self.name}: cannot connect to {socket_path}: {err}"
            ) from err

        self._client = client
        self.disconnected.clear()
        self._watcher = asyncio.create_task(self._watch(client), name=f"qmp-watch-{self.name}")
        log.debug("monitor %s: connected to %s", self.name, socket_path)

    async def close(self) -> None:
        """Close the connection; idempotent, never raises for a dead connection."""
        client = self._client
        if client is None:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self._reap(client), timeout=max(self.command_timeout, 1.0))
        except TimeoutError:
            log.warning("monitor %s: timed out closing the QMP connection", self.name)
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._watcher = None
        self._client = None
        self._mark_disconnected()

    def _reset_session(self) -> None:
        self._events = deque()
        self._dropped = 0
        self._last_state_event = None
        self._disconnect_reason = None
        self._closing = False
        self._expect_exit = False
        self._reaper = None

    async def _watch(self, client: _Client) -> None:
        """Notice the library leaving RUNNING (EOF, bad data, close) and reap it."""
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        # `disconnected` is set only once teardown is done, so that whoever
        # wakes up on it can read `disconnect_reason`.
        try:
            await asyncio.wait_for(self._reap(client), timeout=_REASON_GRACE)
        except TimeoutError:
            log.warning("monitor %s: QMP connection teardown is stuck", self.name)
        finally:
            self._mark_disconnected()

    def _reap(self, client: _Client) -> asyncio.Future[None]:
        """Run `client.disconnect()` exactly once; both `close` and `_watch` await it.

        qemu.qmp does not allow two concurrent ``disconnect()`` calls, hence
        the single shielded task.
        """
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._do_reap(client), name=f"qmp-reap-{self.name}")
        return asyncio.shield(self._reaper)

    async def _do_reap(self, client: _Client) -> None:
        reason = "closed by vmhive"
        try:
            await client.disconnect()
        except Exception as err:  # whatever killed the reader/writer task
            reason = _describe(err)
        finally:
            self._disconnect_reason = reason
            self._mark_disconnected()
        if self._closing or self._expect_exit:
            log.debug("monitor %s: disconnected: %s", self.name, reason)
        else:
            log.warning("monitor %s: QMP connection lost: %s", self.name, reason)

    def _mark_disconnected(self) -> None:
        self.disconnected.set()
        self._wake_waiters()

    async def _await_reason(self) -> str:
        """Wait (briefly) for teardown so an exception can say why we lost QEMU."""
        client = self._client
        if client is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reap(client), timeout=_REASON_GRACE)
        return self._disconnect_reason or "connection lost"

    # -- commands -----------------------------------------------------------

    async def _execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> object:
        """Run one command with a deadline, translating every failure."""
        client = self._client
        if client is None or not self.connected:
            reason = self._disconnect_reason or "not connected"
            raise MonitorDisconnected(f"monitor {self.name}: cannot run '{command}': {reason}")
        deadline = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(deadline):
                return await client.execute(command, arguments)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, err.error.error.desc) from err
        except TimeoutError:
            raise MonitorTimeout(
                f"monitor {self.name}: no reply to '{command}' within {deadline:g}s"
            ) from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as err:
            # ExecInterruptedError is what the library raises when the session
            # dies under a pending command; the others are defensive.
            reason = await self._await_reason()
            raise MonitorDisconnected(
                f"monitor {self.name}: connection lost during '{command}': {reason}"
            ) from err
        except QMPError as err:  # e.g. BadReplyError: malformed, but routed, reply
            raise MonitorError(f"monitor {self.name}: bad reply to '{command}': {err}") from err

    async def query_status(self) -> RunStatus:
        reply = _expect_dict("query-status", await self._execute("query-status"))
        status = reply.get("status")
        if not isinstance(status, str):
            raise MonitorError(f"unexpected reply to 'query-status': {reply!r:.200}")
        return RunStatus(status=status, running=bool(reply.get("running", False)))

    async def query_version(self) -> str:
        """QEMU's version as "major.minor.micro", e.g. "7.2.22"."""
        reply = _expect_dict("query-version", await self._execute("query-version"))
        qemu = _expect_dict("query-version", reply.get("qemu"))
        try:
            return f"{int(qemu['major'])}.{int(qemu['minor'])}.{int(qemu['micro'])}"
        except (KeyError, TypeError, ValueError) as err:
            raise MonitorError(f"unexpected reply to 'query-version': {reply!r:.200}") from err

    async def stop(self) -> None:
        """Pause all vCPUs (QEMU emits STOP)."""
        await self._execute("stop")

    async def cont(self) -> None:
        """Resume the vCPUs (QEMU emits RESUME)."""
        await self._execute("cont")

    async def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides what to do."""
        await self._execute("system_powerdown")

    async def system_reset(self) -> None:
        await self._execute("system_reset")

    async def change_medium(self, device_id: str, filename: str) -> None:
        """Put an ISO into a CD-ROM drive (opening and closing its tray)."""
        await self._execute(
            "blockdev-change-medium",
            {"id": device_id, "filename": filename, "format": "raw", "read-only-mode": "read-only"},
        )

    async def eject(self, device_id: str) -> None:
        """Take the medium out, even if the guest locked the tray."""
        await self._execute("eject", {"id": device_id, "force": True})

    async def blockdev_add(self, node: Mapping[str, object]) -> None:
        await self._execute("blockdev-add", node)

    async def blockdev_del(self, node_name: str) -> None:
        await self._execute("blockdev-del", {"node-name": node_name})

    async def device_add(self, device: Mapping[str, object]) -> None:
        await self._execute("device_add", device)

    async def device_del(self, device_id: str) -> None:
        """Ask the guest to release a device; DEVICE_DELETED follows when it has."""
        await self._execute("device_del", {"id": device_id})

    async def query_pci(self) -> list[dict[str, Any]]:
        result = await self._execute("query-pci")
        return [dict(bus) for bus in result] if isinstance(result, list) else []

    async def block_resize(self, node_name: str, size: int) -> None:
        """Grow a disk under a running guest (the guest sees a capacity change)."""
        await self._execute("block_resize", {"node-name": node_name, "size": size})

    async def netdev_add(self, netdev: Mapping[str, object]) -> None:
        await self._execute("netdev_add", netdev)

    async def netdev_del(self, netdev_id: str) -> None:
        await self._execute("netdev_del", {"id": netdev_id})

    async def set_link(self, device_id: str, up: bool) -> None:
        """Plug or unplug the virtual cable of a NIC (the guest sees link up/down)."""
        await self._execute("set_link", {"name": device_id, "up": up})

    async def blockdev_mirror(
        self, job_id: str, device: str, target: str, *, speed: int | None = None
    ) -> None:
        """Copy a whole disk (its backing chain flattened) to `target` while the guest
        writes on; BLOCK_JOB_READY says the two are in sync from then on. `speed`
        caps the copy in bytes/s."""
        args: dict[str, object] = {"job-id": job_id, "device": device, "target": target}
        args["sync"] = "full"
        if speed:
            args["speed"] = speed
        await self._execute("blockdev-mirror", args)

    async def block_job_cancel(self, job_id: str, *, force: bool = False) -> None:
        """On a READY mirror: stop mirroring, leaving the target a point-in-time copy
        (BLOCK_JOB_COMPLETED follows); before READY the copy is abandoned. `force`
        abandons a READY mirror at once, without its final synchronisation."""
        args: dict[str, object] = {"device": job_id}
        if force:
            args["force"] = True
        await self._execute("block-job-cancel", args)

    async def query_block_jobs(self) -> list[dict[str, Any]]:
        result = await self._execute("query-block-jobs")
        return [dict(job) for job in result] if isinstance(result, list) else []

    async def snapshot_internal(self, tag: str, nodes: Sequence[str]) -> None:
        """Internal snapshot `tag` of every node in one transaction: all or none,
        at one instant (QEMU drains their I/O together)."""
        actions = [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": tag}}
            for node in nodes
        ]
        await self._execute("transaction", {"actions": actions})

    async def snapshot_save(
        self, job_id: str, tag: str, vmstate: str, nodes: Sequence[str]
    ) -> None:
        """Start a job saving RAM and device state into `vmstate` and snapshot `tag` of
        every node; JOB_STATUS_CHANGE events follow it to `concluded`."""
        await self._execute(
            "snapshot-save",
            {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": list(nodes)},
        )

    async def snapshot_load(
        self, job_id: str, tag: str, vmstate: str, nodes: Sequence[str]
    ) -> None:
        """Start a job reverting every node to snapshot `tag` and loading its RAM."""
        await self._execute(
            "snapshot-load",
            {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": list(nodes)},
        )

    async def snapshot_delete(self, job_id: str, tag: str, nodes: Sequence[str]) -> None:
        """Start a job deleting snapshot `tag` from those of `nodes` that have it."""
        await self._execute(
            "snapshot-delete", {"job-id": job_id, "tag": tag, "devices": list(nodes)}
        )

    async def query_jobs(self) -> list[dict[str, Any]]:
        """QEMU's generic jobs (id, type, status, error once concluded)."""
        result = await self._execute("query-jobs")
        return [dict(job) for job in result] if isinstance(result, list) else []

    async def job_dismiss(self, job_id: str) -> None:
        """Forget a concluded job (snapshot jobs wait for this)."""
        await self._execute("job-dismiss", {"id": job_id})

    # -- live migration (see hypervisor/qemu/migration) ----------------------

    async def migrate_set_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
        await self._execute("migrate-set-capabilities", {"capabilities": caps})

    async def query_migrate_capabilities(self) -> dict[str, bool]:
        result = await self._execute("query-migrate-capabilities")
        caps = result if isinstance(result, list) else []
        return {str(c["capability"]): bool(c["state"]) for c in caps if isinstance(c, dict)}

    async def migrate_set_parameters(self, parameters: Mapping[str, object]) -> None:
        await self._execute("migrate-set-parameters", parameters)

    async def query_migrate_parameters(self) -> dict[str, Any]:
        return _expect_dict(
            "query-migrate-parameters", await self._execute("query-migrate-parameters")
        )

    async def migrate(self, uri: str) -> None:
        """Start sending RAM and device state to a target listening on `uri`."""
        await self._execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        """On a QEMU started with ``-incoming defer``: listen for a migration on `uri`."""
        await self._execute("migrate-incoming", {"uri": uri})

    async def query_migrate(self) -> dict[str, Any]:
        """Status and statistics of the current (or last) migration."""
        return _expect_dict("query-migrate", await self._execute("query-migrate"))

    async def migrate_cancel(self) -> None:
        await self._execute("migrate_cancel")

    async def migrate_continue(self, state: str) -> None:
        """Leave a pause state (``pre-switchover``) of the pause-before-switchover capability."""
        await self._execute("migrate-continue", {"state": state})

    async def migrate_start_postcopy(self) -> None:
        await self._execute("migrate-start-postcopy")

    async def nbd_server_start(self, address: Mapping[str, object]) -> None:
        """Start the NBD server on `address` (a legacy SocketAddress: ``{"type", "data"}``)."""
        await self._execute("nbd-server-start", {"addr": address})

    async def nbd_server_stop(self) -> None:
        await self._execute("nbd-server-stop")

    async def block_export_add(self, export_id: str, node_name: str, *, writable: bool) -> None:
        """Export `node_name` over the running NBD server, under the name `export_id`."""
        await self._execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": export_id,
                "node-name": node_name,
                "name": export_id,
                "writable": writable,
            },
        )

    async def block_export_del(self, export_id: str, *, hard: bool = False) -> None:
        """Remove an export; `hard` drops its client connections instead of refusing."""
        await self._execute(
            "block-export-del", {"id": export_id, "mode": "hard" if hard else "safe"}
        )

    async def yank_block_nodes(self, node_names: Sequence[str]) -> None:
        """Shut the connections of these (NBD client) block nodes down at once: their
        requests in flight fail instead of waiting for a peer cut off or gone."""
        instances = [{"type": "block-node", "node-name": name} for name in node_names]
        await self._execute("yank", {"instances": instances})

    async def query_named_block_nodes(self) -> list[dict[str, Any]]:
        """Every block node, top-level or not (``flat``: no nested backing chains)."""
        result = await self._execute("query-named-block-nodes", {"flat": True})
        return [dict(node) for node in result] if isinstance(result, list) else []

    async def block_node_sizes(self) -> dict[str, int]:
        """Each block node's virtual size in bytes, by node name."""
        return {
            str(n.get("node-name")): int((n.get("image") or {}).get("virtual-size", 0))
            for n in await self.query_named_block_nodes()
        }

    async def query_blockstats(self) -> list[dict[str, Any]]:
        """Each block device's cumulative I/O counters (bytes, operations)."""
        result = await self._execute("query-blockstats")
        return [dict(entry) for entry in result] if isinstance(result, list) else []

    async def quit(self) -> None:
        """Make QEMU exit.

        QEMU replies and then closes the socket; the close may overtake the
        reply, so losing the connection here counts as success.
        """
        self._expect_exit = True
        with contextlib.suppress(MonitorDisconnected):
            await self._execute("quit")

    async def query_kvm(self) -> tuple[bool, bool]:
        """``(enabled, present)``: KVM in use by this VM, KVM available on the host."""
        reply = _expect_dict("query-kvm", await self._execute("query-kvm"))
        return bool(reply.get("enabled", False)), bool(reply.get("present", False))

    async def query_cpus_fast(self) -> list[dict[str, Any]]:
        """The raw ``query-cpus-fast`` entries; see `query_vcpus` for typed ones."""
        reply = await self._execute("query-cpus-fast")
        if not isinstance(reply, list) or not all(isinstance(c, dict) for c in reply):
            raise MonitorError(f"unexpected reply to 'query-cpus-fast': {reply!r:.200}")
        return reply

    async def query_vcpus(self) -> list[VcpuInfo]:
        """``query-cpus-fast`` as `VcpuInfo` (vCPU host thread ids, for pinning/stats)."""
        out: list[VcpuInfo] = []
        for cpu in await self.query_cpus_fast():
            thread_id = cpu.get("thread-id")
            props = cpu.get("props")
            out.append(
                VcpuInfo(
                    cpu_index=int(cpu.get("cpu-index", len(out))),
                    qom_path=str(cpu.get("qom-path", "")),
                    thread_id=thread_id if isinstance(thread_id, int) else None,
                    target=str(cpu.get("target", "")),
                    props=dict(props) if isinstance(props, dict) else {},
                )
            )
        return out

    async def human_monitor_command(self, command: str) -> str:
        """Run an HMP command line and return its text output.

        An escape hatch for diagnostics only: HMP output is not a stable API.
        """
        reply = await self._execute("human-monitor-command", {"command-line": command})
        if not isinstance(reply, str):
            raise MonitorError(f"unexpected reply to 'human-monitor-command': {reply!r:.200}")
        return reply

    # -- events -------------------------------------------------------------

    def events_dropped(self) -> int:
        """How many events this session discarded because the queue was full."""
        return self._dropped

    def events_pending(self) -> int:
        """How many events are queued and not yet read (never > event_queue_size)."""
        return len(self._events)

    @property
    def last_state_event(self) -> QmpEvent | None:
        """The most recent lifecycle event of this session, even if it was dropped."""
        return self._last_state_event

    async def next_event(self, timeout: float | None = None) -> QmpEvent:
        """The oldest queued event; waits up to ``timeout`` (None: until disconnect).

        Raises `MonitorTimeout` on timeout and `MonitorDisconnected` once the
        session is gone and the queue is empty.
        """
        return await self._take(None, timeout)

    async def wait_event(self, name: str, timeout: float) -> QmpEvent:
        """The oldest queued or future event called ``name``.

        Other events are left in the queue, in order, for `next_event`.
        """
        return await self._take(name, timeout)

    def _on_event(self, msg: Message) -> None:
        """Called by the client's reader for every event (never blocks)."""
        event = _event_from_message(msg)
        if event.is_lifecycle:
            self._last_state_event = event
            if event.name == "SHUTDOWN":
                self._expect_exit = True
        if len(self._events) >= self.event_queue_size:
            self._evict()
        self._events.append(event)
        self._wake_waiters()

    def _evict(self) -> None:
        victim = next((i for i, e in enumerate(self._events) if not e.is_lifecycle), 0)
        dropped = self._events[victim]
        del self._events[victim]
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            log.warning(
                "monitor %s: event queue full (%d), dropped %d event(s) so far (latest: %s)",
                self.name,
                self.event_queue_size,
                self._dropped,
                dropped.name,
            )

    def _pop(self, name: str | None) -> QmpEvent | None:
        if name is None:
            return self._events.popleft() if self._events else None
        for i, event in enumerate(self._events):
            if event.name == name:
                del self._events[i]
                return event
        return None

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _take(self, name: str | None, timeout: float | None) -> QmpEvent:
        what = "an event" if name is None else f"event {name}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self._pop(name)
                    if event is not None:
                        return event
                    if self.disconnected.is_set():
                        reason = self._disconnect_reason or "not connected"
                        raise MonitorDisconnected(
                            f"monitor {self.name}: no more events, waiting for {what}: {reason}"
                        )
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in self._waiters:
                            self._waiters.remove(fut)
        except TimeoutError:
            raise MonitorTimeout(
                f"monitor {self.name}: no {what} within {timeout:g}s"  # timeout is set here
            ) from None
