"""Benchmark: `vmhive vm start` latency against launching the same QEMU by hand.

vmhive: POST /api/vms/NAME/start?wait=true over the unix socket, until the
answer (the job has ended: QEMU runs and its QMP monitor answered).
By hand: spawn the exact argv vmhive used (read from the VM's runtime record),
wait for the QMP socket, connect, negotiate, `cont`, `query-status`.
Both run in the same process, alternating, on the same machine.

Usage: .venv/bin/python bench/start_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.functional.hive import Hive

from vmhive.hypervisor.qemu.qmp import MonitorError, QmpMonitor


def vmhive_start(client: httpx.Client, name: str) -> float:
    began = time.perf_counter()
    response = client.post(f"/api/vms/{name}/start", params={"wait": "true"})
    elapsed = time.perf_counter() - began
    assert response.json()["state"] == "succeeded", response.text
    client.post(f"/api/vms/{name}/force-stop", params={"wait": "true"})
    return elapsed


async def by_hand(argv: list[str], run_dir: Path) -> float:
    elapsed, proc = await launch_by_hand(argv, run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return elapsed


async def launch_by_hand(argv: list[str], run_dir: Path) -> tuple[float, subprocess.Popen[bytes]]:
    """Spawn QEMU, wait for QMP, negotiate, `cont`: what vmhive's start does, by hand."""
    qmp = run_dir / "qmp.sock"
    for name in ("qmp.sock", "serial.sock", "vnc.sock", "qemu.pid"):
        (run_dir / name).unlink(missing_ok=True)
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    while not qmp.exists():
        await asyncio.sleep(0.002)
    while True:  # QEMU binds the socket before it listens: retry a refused connect
        monitor = QmpMonitor("bench")
        try:
            await monitor.connect(qmp)
            break
        except MonitorError:
            await monitor.close()
            await asyncio.sleep(0.002)
    await monitor.cont()
    status = await monitor.query_status()
    elapsed = time.perf_counter() - began
    assert status.running
    await monitor.close()
    return elapsed, proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE", ".cache/images")).resolve()
    hive = Hive(images)
    hive.start()
    try:
        hive.cli("vm", "create", "bench", "--generation", "2", "--memory", "256", "--image", "tiny")
        uuid = hive.vm("bench")["uuid"]
        # One client for the run, as a script would hold (its set-up is not the API's cost).
        transport = httpx.HTTPTransport(uds=str(hive.data_dir / "api.sock"))
        client = httpx.Client(transport=transport, base_url="http://vmhive", timeout=60)
        vmhive_start(client, "bench")  # warm-up; also leaves the runtime record
        record = json.loads((hive.data_dir / "run" / uuid / "runtime.json").read_text())
        hand_dir = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
        run_dir = hive.data_dir / "run" / uuid
        argv = [a.replace(str(run_dir), str(hand_dir)) for a in record["argv"]]
        asyncio.run(by_hand(argv, hand_dir))  # warm-up
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(vmhive_start(client, "bench"))
            theirs.append(asyncio.run(by_hand(argv, hand_dir)))
        shutil.rmtree(hand_dir, ignore_errors=True)
        client.close()
    finally:
        hive.close()
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    print(f"runs: {args.runs}")
    print(
        f"vmhive vm start   median {med_ours * 1000:7.1f} ms  (min {min(ours) * 1000:.1f}, max {max(ours) * 1000:.1f})"
    )
    print(
        f"QEMU by hand      median {med_theirs * 1000:7.1f} ms  (min {min(theirs) * 1000:.1f}, max {max(theirs) * 1000:.1f})"
    )
    print(
        f"overhead          median {(med_ours - med_theirs) * 1000:7.1f} ms  ratio {med_ours / med_theirs:.2f}"
    )


if __name__ == "__main__":
    main()
