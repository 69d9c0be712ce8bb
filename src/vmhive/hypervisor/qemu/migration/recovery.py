"""What an interrupted outgoing migration leaves in the source QEMU, undone.

When the daemon driving a migration dies, QEMU goes on by itself: the mirror
jobs keep copying, RAM keeps moving, and with pause-before-switchover the
guest ends up stopped at `pre-switchover`, waiting for a `migrate-continue`
that will never come. At the next start, once the target was told to abort,
`abandon` cancels all of it on the re-adopted QEMU and runs the guest on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from vmhive.hypervisor.qemu.migration.model import MigrationError
from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor

UNDO_DEADLINE = 30.0
ENDED = ("completed", "failed", "cancelled")


async def abandon(monitor: QmpMonitor) -> str:
    """Cancel the migration, its mirror jobs and NBD nodes; `cont` the guest."""
    status = str((await monitor.query_migrate()).get("status", "none"))
    if status not in ("none", *ENDED):
        await monitor.migrate_cancel()
        deadline = time.monotonic() + UNDO_DEADLINE
        while (await monitor.query_migrate()).get("status") not in ENDED:
            if time.monotonic() > deadline:
                raise MigrationError("the interrupted migration did not stop")
            await asyncio.sleep(0.1)
    deadline = time.monotonic() + UNDO_DEADLINE
    while jobs := [
        str(j.get("device", ""))
        for j in await monitor.query_block_jobs()
        if str(j.get("device", "")).startswith("migrate-")
    ]:
        for job in jobs:
            with contextlib.suppress(MonitorError):
                await monitor.block_job_cancel(job, force=True)
        if time.monotonic() > deadline:
            raise MigrationError(f"the interrupted migration's mirror jobs did not end: {jobs}")
        await asyncio.sleep(0.1)
    for node in await monitor.query_named_block_nodes():
        name = str(node.get("node-name", ""))
        if name.startswith("migrate-nbd-"):
            with contextlib.suppress(MonitorError):
                await monitor.blockdev_del(name)
    await monitor.migrate_set_capabilities({"pause-before-switchover": False})
    if not (await monitor.query_status()).running:
        await monitor.cont()
    return f"the interrupted migration ({status}) was undone"
