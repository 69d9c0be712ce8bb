"""Benchmark: snapshot pauses and reverts, vmhive against QEMU's own commands.

Two gen 2 tiny guests (256 MiB and 1 GiB), booted. For each, in one run and
alternating, vmhive (the REST API, ?wait=true, over the unix socket) and the
same operation by hand on a second QEMU started from the very argv vmhive used
(its runtime record), on its own overlay and UEFI variables:

1. disk-only snapshot of the running guest. By hand: QMP `stop`, a
   `transaction` of blockdev-snapshot-internal-sync, a copy of the variables
   file, `cont`.
2. snapshot with RAM. By hand: `stop`, the variables copy, a `snapshot-save`
   job (to `concluded`, then `job-dismiss`), `cont`.
3. revert to the disk-only snapshot of the running guest (left stopped).
   By hand: `quit`, `qemu-img snapshot -a`, the variables copied back.
4. revert to the RAM snapshot of the stopped guest (running after). By hand:
   `qemu-img snapshot -a`, variables back, QEMU launched with -S, a
   `snapshot-load` job, `cont`.
5. For reference, by hand only: QEMU's background-snapshot (RAM streamed to a
   file while the guest runs, userfaultfd write-protection): pause and total.

The pause is QEMU's own account on both sides: the time between the STOP and
RESUME events it sends (vCPUs stopped). The total is the wall-clock time of the
whole operation as its caller sees it.

Usage: .venv/bin/python bench/snapshots.py [--runs N] [--sizes 256,1024]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from qemu.qmp import EventListener, QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.functional.hive import READY, Hive

from vmhive.services.host import OVMF_VARS


class ByHand:
    """A second QEMU of the same VM, driven with raw QMP commands."""

    def __init__(self, argv: list[str], run_dir: Path, disk: Path, vars_file: Path) -> None:
        self.argv, self.run_dir, self.disk, self.vars_file = argv, run_dir, disk, vars_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient("bench")
        self.events = EventListener(("STOP", "RESUME"))
        self.jobs = EventListener("JOB_STATUS_CHANGE")

    async def launch(self) -> None:
        for name in ("qmp.sock", "serial.sock", "vnc.sock", "qemu.pid"):
            (self.run_dir / name).unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        sock = self.run_dir / "qmp.sock"
        while True:  # QEMU binds the socket before it listens: retry a refused connect
            try:
                self.qmp = QMPClient("bench")
                await self.qmp.connect(str(sock))
                break
            except Exception:
                await asyncio.sleep(0.002)
        self.events = EventListener(("STOP", "RESUME"))
        self.jobs = EventListener("JOB_STATUS_CHANGE")
        self.qmp.register_listener(self.events)
        self.qmp.register_listener(self.jobs)

    async def boot(self) -> None:
        await self.launch()
        reader, writer = await asyncio.open_unix_connection(str(self.run_dir / "serial.sock"))
        await self.qmp.execute("cont")
        seen = b""
        async with asyncio.timeout(180):
            while READY.encode() not in seen:
                seen += await reader.read(4096)
        writer.close()

    async def quit(self) -> None:
        assert self.proc is not None
        await self.qmp.execute("quit")
        with contextlib.suppress(EOFError):  # QEMU hangs up as it exits
            await self.qmp.disconnect()
        await asyncio.to_thread(self.proc.wait, 10)

    async def pause_of(self, operation: Callable[[], Any]) -> tuple[float, float]:
        """(pause, total) of an operation, in seconds."""
        self.events.clear()
        began = time.perf_counter()
        await operation()
        total = time.perf_counter() - began
        stamps: dict[str, float] = {}
        while len(stamps) < 2:
            event = await asyncio.wait_for(self.events.get(), 10)
            t = event["timestamp"]
            stamps[event["event"]] = t["seconds"] + t["microseconds"] / 1e6
        return stamps["RESUME"] - stamps["STOP"], total

    async def job(self, command: str, args: dict[str, Any]) -> None:
        await self.qmp.execute(command, args)
        while True:
            event = await asyncio.wait_for(self.jobs.get(), 600)
            if event["data"]["id"] == args["job-id"] and event["data"]["status"] == "concluded":
                break
        await self.qmp.execute("job-dismiss", {"id": args["job-id"]})

    async def snapshot(self, tag: str, memory: bool) -> None:
        await self.qmp.execute("stop")
        shutil.copyfile(self.vars_file, self.vars_file.with_suffix(f".{tag}"))
        if memory:
            await self.job(
                "snapshot-save",
                {"job-id": tag, "tag": tag, "vmstate": "disk0", "devices": ["disk0"]},
            )
        else:
            await self.qmp.execute(
                "transaction",
                {"actions": [{"type": "blockdev-snapshot-internal-sync",
                              "data": {"device": "disk0", "name": tag}}]},
            )  # fmt: skip
        await self.qmp.execute("cont")

    async def delete(self, tag: str) -> None:
        await self.job("snapshot-delete", {"job-id": f"d{tag}", "tag": tag, "devices": ["disk0"]})

    async def revert_disk(self, tag: str) -> None:
        await self.quit()
        await apply(self.disk, tag)
        shutil.copyfile(self.vars_file.with_suffix(f".{tag}"), self.vars_file)

    async def revert_ram(self, tag: str) -> None:
        await apply(self.disk, tag)
        shutil.copyfile(self.vars_file.with_suffix(f".{tag}"), self.vars_file)
        await self.launch()
        await self.job(
            "snapshot-load",
            {"job-id": "load", "tag": tag, "vmstate": "disk0", "devices": ["disk0"]},
        )
        await self.qmp.execute("cont")

    async def background_snapshot(self, target: Path) -> tuple[float, float]:
        caps = {"capabilities": [{"capability": "background-snapshot", "state": True}]}
        await self.qmp.execute("migrate-set-capabilities", caps)
        with target.open("wb") as stream:
            self.qmp.send_fd_scm(stream.fileno())
            await self.qmp.execute("getfd", {"fdname": "vmstate"})

        async def run() -> None:
            await self.qmp.execute("migrate", {"uri": "fd:vmstate"})
            while (await self.qmp.execute("query-migrate"))["status"] not in (
                "completed",
                "failed",
            ):
                await asyncio.sleep(0.01)

        result = await self.pause_of(run)
        caps["capabilities"][0]["state"] = False
        await self.qmp.execute("migrate-set-capabilities", caps)
        return result


async def apply(disk: Path, tag: str) -> None:
    proc = await asyncio.create_subprocess_exec("qemu-img", "snapshot", "-a", tag, str(disk))
    assert await proc.wait() == 0


def call(
    client: httpx.Client, method: str, path: str, **kwargs: Any
) -> tuple[dict[str, Any], float]:
    began = time.perf_counter()
    response = client.request(method, path, params={"wait": "true"}, **kwargs)
    elapsed = time.perf_counter() - began
    body: dict[str, Any] = response.json()
    if response.status_code >= 400 or body.get("state") != "succeeded":
        raise RuntimeError(f"{method} {path}: {response.status_code} {body}")
    return body, elapsed


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def report(what: str, ours: list[float], theirs: list[float]) -> None:
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"  {what:<24} vmhive {ms(ours)}   by hand {ms(theirs)}   ratio {ratio:.2f}")


def bench_size(hive: Hive, client: httpx.Client, memory: int, runs: int) -> None:
    name = f"snap-{memory}"
    hive.cli("vm", "create", name, "--generation", "2", "--memory", str(memory),
             "--image", "tiny", "--start")  # fmt: skip
    hive.wait_ready(name)
    vm = hive.vm(name)
    run_dir = hive.data_dir / "run" / vm["uuid"]
    record = json.loads((run_dir / "runtime.json").read_text())
    hand_dir = Path(tempfile.mkdtemp(prefix="vhs-", dir="/tmp"))
    disk, vars_file = (
        vm["disks"][0]["path"],
        str(hive.data_dir / "vms" / vm["uuid"] / "OVMF_VARS.fd"),
    )
    hand_disk, hand_vars = hand_dir / "disk0.qcow2", hand_dir / "vars.fd"
    image = hive.image_dir / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image),
                    str(hand_disk)], check=True)  # fmt: skip
    shutil.copyfile(OVMF_VARS, hand_vars)
    argv = [a.replace(str(run_dir), str(hand_dir)).replace(disk, str(hand_disk))
            .replace(vars_file, str(hand_vars)) for a in record["argv"]]  # fmt: skip
    hand = ByHand(argv, hand_dir, hand_disk, hand_vars)
    print(f"## gen 2 tiny guest, {memory} MiB")
    try:
        asyncio.run(run_size(hive, client, hand, name, runs))
    finally:
        if hand.proc is not None:
            hand.proc.kill()
            hand.proc.wait()
        shutil.rmtree(hand_dir, ignore_errors=True)
        client.request("DELETE", f"/api/vms/{name}", params={"force": "true", "wait": "true"})


async def run_size(hive: Hive, client: httpx.Client, hand: ByHand, name: str, runs: int) -> None:
    await hand.boot()
    path = f"/api/vms/{name}/snapshots"
    for memory in (False, True):
        pause_ours, total_ours, pause_hand, total_hand = [], [], [], []
        for i in range(runs + 1):
            body, elapsed = await asyncio.to_thread(
                call, client, "POST", path, json={"name": f"b{i}", "memory": memory}
            )
            tag = f"h{i}"
            pause, total = await hand.pause_of(lambda t=tag, m=memory: hand.snapshot(t, m))
            if i:  # the first of each is a warm-up
                pause_ours.append(body["result"]["pause_ms"] / 1000)
                total_ours.append(elapsed)
                pause_hand.append(pause)
                total_hand.append(total)
            await asyncio.to_thread(call, client, "DELETE", f"{path}/b{i}")
            await hand.delete(tag)
        kind = "with RAM" if memory else "disk-only"
        report(f"{kind} snapshot: pause", pause_ours, pause_hand)
        report(f"{kind} snapshot: total", total_ours, total_hand)
    snap = await asyncio.to_thread(call, client, "POST", path, json={"name": "ram", "memory": True})
    size = snap[0]["result"]["size_bytes"]
    await asyncio.to_thread(call, client, "POST", path, json={"name": "disk"})
    await hand.snapshot("ram", True)
    await hand.snapshot("disk", False)
    disk_ours, disk_hand, ram_ours, ram_hand = [], [], [], []
    for i in range(runs + 1):
        _, elapsed = await asyncio.to_thread(call, client, "POST", f"{path}/disk/revert")
        began = time.perf_counter()
        await hand.revert_disk("disk")
        by_hand = time.perf_counter() - began
        if i:
            disk_ours.append(elapsed)
            disk_hand.append(by_hand)
        _, elapsed = await asyncio.to_thread(call, client, "POST", f"{path}/ram/revert")
        began = time.perf_counter()
        await hand.revert_ram("ram")
        by_hand = time.perf_counter() - began
        if i:
            ram_ours.append(elapsed)
            ram_hand.append(by_hand)
    report("revert, disk-only", disk_ours, disk_hand)
    report("revert, with RAM", ram_ours, ram_hand)
    print(f"  saved RAM and device state: {size / 2**20:.1f} MiB")
    target = hand.run_dir / "background.vmstate"
    pause, total = await hand.background_snapshot(target)
    print(
        f"  reference, by hand: background-snapshot of the RAM: pause {pause * 1000:.1f} ms, "
        f"total {total * 1000:.0f} ms ({target.stat().st_size / 2**20:.1f} MiB written)"
    )
    await hand.quit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="256,1024", help="guest memory sizes in MiB")
    args = parser.parse_args()
    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE", ".cache/images")).resolve()
    hive = Hive(images)
    hive.start()
    try:
        transport = httpx.HTTPTransport(uds=str(hive.data_dir / "api.sock"))
        client = httpx.Client(transport=transport, base_url="http://vmhive", timeout=600)
        print(f"runs: {args.runs} (medians; pause = QEMU's STOP to RESUME event timestamps)")
        for memory in (int(size) for size in args.sizes.split(",")):
            bench_size(hive, client, memory, args.runs)
        client.close()
    finally:
        hive.close()


if __name__ == "__main__":
    main()
