"""Benchmarks: linked clones, 20 linked clones started, full-clone throughput.

1. Linked clone through the API, end to end: POST /api/vms/TEMPLATE/clone?wait=true
   (a new VM record, a qcow2 overlay on the template's disk, the UEFI variables
   copied), with a 1 GiB and a 20 GiB template disk. By hand: `qemu-img create
   -b` of the same overlay and a copy of the variables file.
2. 20 linked clones of a gen 1 template, each created and started through the API
   (the start job ends when QEMU runs and answered on QMP). By hand: for each,
   `qemu-img create -b` and the QEMU argv vmhive used, up to QMP `cont`.
3. Full clone of a template holding 1 GiB of data: vmhive's `clone --full`
   against `qemu-img convert -O qcow2` of the same disk, as throughput.

Runs alternate vmhive and by hand in one process. Usage:
    .venv/bin/python bench/clones.py [--runs N] [--skip-twenty]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.start_latency import launch_by_hand
from tests.functional.hive import Hive

from vmhive.services.host import OVMF_VARS

GIB = 1024**3


def api(client: httpx.Client, method: str, path: str, **kwargs: object) -> dict[str, object]:
    response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    body: dict[str, object] = response.json()
    if response.status_code >= 400 or body.get("state") not in (None, "succeeded"):
        raise RuntimeError(f"{method} {path}: {response.status_code} {body}")
    return body


def make_template(hive: Hive, name: str, size: str, generation: int, data: str | None) -> str:
    memory = "256" if generation == 2 else "64"
    hive.cli("vm", "create", name, "-g", str(generation), "--memory", memory,
             "--disk-size", size)  # fmt: skip
    disk = str(hive.vm(name)["disks"][0]["path"])
    if data:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}", disk],
                       check=True, capture_output=True)  # fmt: skip
    hive.cli("vm", "template", name)
    return disk


def linked_clone_latency(hive: Hive, client: httpx.Client, runs: int) -> None:
    print("## linked clone, end to end through the API (gen 2: overlay + UEFI variables)")
    scratch = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
    for size in ("1G", "20G"):
        template = f"tmpl-{size.lower()}"
        disk = make_template(hive, template, size, 2, None)
        ours, theirs = [], []
        for i in range(runs + 1):
            began = time.perf_counter()
            api(client, "POST", f"/api/vms/{template}/clone", params={"wait": "true"},
                json={"name": f"lc-{i}"})  # fmt: skip
            elapsed = time.perf_counter() - began
            began = time.perf_counter()
            overlay = scratch / f"lc-{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk,
                            str(overlay)], check=True)  # fmt: skip
            shutil.copyfile(OVMF_VARS, scratch / f"lc-{i}.fd")
            by_hand = time.perf_counter() - began
            if i:  # the first of each is a warm-up
                ours.append(elapsed)
                theirs.append(by_hand)
        for i in range(runs + 1):
            api(client, "DELETE", f"/api/vms/lc-{i}", params={"wait": "true"})
        report(f"{size} base", ours, theirs)
    shutil.rmtree(scratch, ignore_errors=True)


def twenty_clones(hive: Hive, client: httpx.Client) -> None:
    print("## 20 linked clones of a gen 1 template, created and started")
    make_template(hive, "tmpl-twenty", "1G", 1, None)
    began = time.perf_counter()
    for i in range(20):
        api(client, "POST", "/api/vms/tmpl-twenty/clone", params={"wait": "true"},
            json={"name": f"tw-{i}", "start": True})  # fmt: skip
    ours = time.perf_counter() - began
    vms = [hive.vm(f"tw-{i}") for i in range(20)]
    assert all(vm["state"] == "running" for vm in vms)
    records = []
    for vm in vms:
        run_dir = hive.data_dir / "run" / str(vm["uuid"])
        records.append((json.loads((run_dir / "runtime.json").read_text())["argv"], vm))
        api(client, "POST", f"/api/vms/{vm['name']}/force-stop", params={"wait": "true"})
    base = str(hive.vm("tmpl-twenty")["disks"][0]["path"])
    hand_root = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
    processes = []

    async def all_by_hand() -> None:
        for n, (argv, vm) in enumerate(records):
            run_dir = hive.data_dir / "run" / str(vm["uuid"])
            hand_dir = hand_root / str(n)
            hand_dir.mkdir()
            disk = str(vm["disks"][0]["path"])
            hand_disk = hand_dir / "disk0.qcow2"
            argv = [a.replace(str(run_dir), str(hand_dir)).replace(disk, str(hand_disk))
                    for a in argv]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base,
                str(hand_disk))  # fmt: skip
            await proc.wait()
            processes.append((await launch_by_hand(argv, hand_dir))[1])

    began = time.perf_counter()
    asyncio.run(all_by_hand())
    theirs = time.perf_counter() - began
    for proc in processes:
        proc.kill()
        proc.wait()
    shutil.rmtree(hand_root, ignore_errors=True)
    print(f"vmhive   {ours:6.2f} s for 20 ({ours / 20 * 1000:.0f} ms each)")
    print(f"by hand  {theirs:6.2f} s for 20 ({theirs / 20 * 1000:.0f} ms each)")
    print(f"ratio    {ours / theirs:.2f}")


def full_clone_throughput(hive: Hive, client: httpx.Client, runs: int) -> None:
    print("## full clone of a template holding 1 GiB of data (throughput)")
    disk = make_template(hive, "tmpl-full", "2G", 1, "1G")
    scratch = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
    ours, theirs = [], []
    for i in range(runs):
        began = time.perf_counter()
        api(client, "POST", "/api/vms/tmpl-full/clone", params={"wait": "true"},
            json={"name": "fc", "linked": False})  # fmt: skip
        ours.append(time.perf_counter() - began)
        api(client, "DELETE", "/api/vms/fc", params={"wait": "true"})
        target = scratch / f"fc-{i}.qcow2"
        began = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", disk, str(target)],
                       check=True)  # fmt: skip
        theirs.append(time.perf_counter() - began)
        target.unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    mine, hand = statistics.median(ours), statistics.median(theirs)
    print(f"vmhive clone --full  median {mine:.2f} s  {GIB / mine / 2**20:7.0f} MiB/s")
    print(f"qemu-img convert     median {hand:.2f} s  {GIB / hand / 2**20:7.0f} MiB/s")
    print(f"throughput ratio (vmhive / by hand): {hand / mine:.2f}")


def report(what: str, ours: list[float], theirs: list[float]) -> None:
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{what}: vmhive median {a * 1000:6.1f} ms (min {min(ours) * 1000:.1f}, "
          f"max {max(ours) * 1000:.1f}); by hand median {b * 1000:6.1f} ms; "
          f"ratio {a / b:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--skip-twenty", action="store_true")
    args = parser.parse_args()
    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE", ".cache/images")).resolve()
    hive = Hive(images)
    hive.start()
    try:
        transport = httpx.HTTPTransport(uds=str(hive.data_dir / "api.sock"))
        client = httpx.Client(transport=transport, base_url="http://vmhive", timeout=300)
        linked_clone_latency(hive, client, args.runs)
        if not args.skip_twenty:
            twenty_clones(hive, client)
        full_clone_throughput(hive, client, max(3, args.runs // 3))
        client.close()
    finally:
        hive.close()


if __name__ == "__main__":
    main()
