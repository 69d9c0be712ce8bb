"""Benchmark: VM-to-VM TCP throughput on a vmhive NAT network against a plain Linux bridge.

Everything runs in a network namespace the benchmark creates and deletes
(``vhbench-<random>``); nothing touches the host's interfaces.

vmhive: a daemon in the namespace, network ``lab`` (nat, 10.77.50.0/24), two tiny
gen 2 VMs (virtio-net) with reserved addresses .2 and .3, leased by vmhive's dnsmasq.
By hand: in the same namespace, a bridge with no nftables rules of its own, two
TAPs (``ip tuntap``) and two QEMUs started with the argv vmhive used for its VMs,
with their own TAPs, sockets, disk overlays and UEFI variables, addressed
statically (10.77.51.2 and .3) by typing on their serial consoles.

One transfer: busybox nc listens in VM 2; VM 1 pipes N x 64 KiB of zeros into nc,
which ends once VM 2 has read everything and closed. It is timed inside VM 1
with /proc/uptime (10 ms resolution) and, as a check, on the host around the
console command (which adds the console's round trip). VM 2's rx_bytes counter
confirms the data crossed the network. The pairs alternate (ABBA); the pair not
being measured is paused, so the two never share the two CPUs. Both sides are
CPU-bound in the guests under TCG, so a busy machine makes single runs noisy:
the median of the runs' paired ratios is printed next to the ratio of medians,
and so is the CPU time both QEMUs spent per MiB (the TAP and bridge work of the
host kernel, nftables included, mostly runs in their threads).

Usage: .venv/bin/python bench/net_throughput.py [--runs N] [--seconds S | --mib M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.start_latency import launch_by_hand
from tests.functional.hive import READY, Hive, wait_for
from tests.network.helpers import Netns, kill_and_wait, processes_with_arg_prefix, random_token

from vmhive.config import Settings
from vmhive.hypervisor.qemu.qmp import QmpMonitor
from vmhive.services.host import OVMF_VARS

MIB = 2**20
BLOCK = 64 * 1024
PORT = 5001
VMHIVE_SUBNET = "10.77.50.0/24"
VMHIVE_IPS = ("10.77.50.2", "10.77.50.3")
HAND_BRIDGE = "vhbh-br"
HAND_BRIDGE_ADDRESS = "10.77.51.1/24"
HAND_IPS = ("10.77.51.2", "10.77.51.3")
HAND_TAPS = ("vhbh-t1", "vhbh-t2")
BOOT_DEADLINE = 240.0
TRANSFER_DEADLINE = 300.0
PROBE_MIB = 8
CLOCK_SLACK = 0.5
RX_BYTES = "echo rx $(cat /sys/class/net/eth0/statistics/rx_bytes)"


class SerialConsole:
    """The serial console of a QEMU started by hand, through its unix socket chardev
    (a QEMU server socket). The tiny guest runs a root shell there without login."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.path = path
        self.pending = ""
        self.commands = 0

    def read_until(self, text: str, timeout: float) -> str:
        """Everything the guest printed up to `text`, which is consumed too."""
        deadline = time.monotonic() + timeout
        while text not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {text!r} on {self.path}: {self.pending[-500:]!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{self.path} closed: {self.pending[-500:]!r}")
            self.pending += chunk.decode(errors="replace")
        before, _, self.pending = self.pending.partition(text)
        return before

    def run(self, command: str, timeout: float = 60) -> str:
        """Type `command`; return what it printed."""
        self.commands += 1
        mark = f"@@vhb{self.commands}@@"
        # Quoting splits the markers in the typed line, so its echo never matches them.
        self.sock.sendall(f"echo {mark}'B'; {command}; echo {mark}'E'\n".encode())
        self.read_until(f"{mark}B", timeout)
        return self.read_until(f"{mark}E", timeout).replace("\r", "").strip("\n")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Pair:
    """Two VMs on one L2 segment: VM 1 sends, VM 2 (at `receiver_ip`) receives."""

    label: str
    sender: Callable[[str, float], str]
    receiver: Callable[[str, float], str]
    receiver_ip: str
    pause: Callable[[], None]
    resume: Callable[[], None]
    qemu_pids: list[int]


@dataclass
class Transfer:
    size: int
    guest_seconds: float  # by the sender's /proc/uptime
    host_seconds: float  # around the console command
    cpu_seconds: float  # user + system time of both QEMUs, TAP and bridge work included

    @property
    def rate(self) -> float:
        return self.size / self.guest_seconds / MIB

    @property
    def host_rate(self) -> float:
        return self.size / self.host_seconds / MIB

    @property
    def cpu_per_mib(self) -> float:
        return self.cpu_seconds * 1000 / (self.size / MIB)

    @property
    def clocks_agree(self) -> bool:
        """The host's time is the guest's plus a console round trip."""
        return 0 <= self.host_seconds - self.guest_seconds <= CLOCK_SLACK

    def __str__(self) -> str:
        return (
            f"{self.rate:5.2f} MiB/s (guest {self.guest_seconds:.2f} s, "
            f"host {self.host_seconds:.2f} s{'' if self.clocks_agree else ' (!)'}, "
            f"QEMU CPU {self.cpu_per_mib:3.0f} ms/MiB)"
        )


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def transfer(pair: Pair, count: int) -> Transfer:
    size = count * BLOCK
    # The listener keeps the console as stdin, where nothing is typed while it runs:
    # at EOF on stdin busybox nc half-closes, and the sender's nc quits on that EOF.
    listen = (
        f"nc -l -p {PORT} >/dev/null & until netstat -ltn | grep -q ':{PORT} '; do sleep 0.1; done"
    )
    rx_before = int(field(pair.receiver(f"{listen}; {RX_BYTES}", 60), "rx"))
    send = (
        "a=$(cut -d' ' -f1 /proc/uptime); "
        f"dd if=/dev/zero bs={BLOCK} count={count} 2>/dev/null | nc {pair.receiver_ip} {PORT}; "
        "rc=$?; b=$(cut -d' ' -f1 /proc/uptime); echo uptime $a $b $rc"
    )
    cpu_before = cpu_seconds(pair.qemu_pids)
    began = time.perf_counter()
    out = pair.sender(send, TRANSFER_DEADLINE)
    host_seconds = time.perf_counter() - began
    cpu = cpu_seconds(pair.qemu_pids) - cpu_before
    start, end, rc = field(out, "uptime").split()
    if rc != "0":
        raise RuntimeError(f"{pair.label}: nc exited with {rc}: {out}")
    received = int(field(pair.receiver(RX_BYTES, 60), "rx")) - rx_before
    if received < size:
        raise RuntimeError(f"{pair.label}: sent {size} bytes but VM 2 received {received}")
    return Transfer(size, float(end) - float(start), host_seconds, cpu)


def field(output: str, key: str) -> str:
    """The rest of the line of `output` that starts with `key `."""
    for line in output.splitlines():
        if line.startswith(f"{key} "):
            return line[len(key) + 1 :]
    raise RuntimeError(f"no {key!r} line in {output!r}")


# ---------------------------------------------------------------------------
# vmhive side


def vmhive_pair(hive: Hive) -> Pair:
    hive.cli("network", "create", "lab", "--subnet", VMHIVE_SUBNET)
    names = ("tp1", "tp2")
    for name, ip in zip(names, VMHIVE_IPS, strict=True):
        hive.cli("vm", "create", name, "--image", "tiny", "-g", "2", "--memory", "256",
                 "--network", "lab", "--ip", ip, "--start")  # fmt: skip

    def each(action: str) -> Callable[[], None]:
        def apply() -> None:
            for name in names:
                hive.cli("vm", action, name)

        return apply

    return Pair(
        label="vmhive",
        sender=lambda command, timeout: hive.run_in_guest(names[0], command, timeout),
        receiver=lambda command, timeout: hive.run_in_guest(names[1], command, timeout),
        receiver_ip=VMHIVE_IPS[1],
        pause=each("pause"),
        resume=each("resume"),
        qemu_pids=[hive.vm(name)["pid"] for name in names],
    )


def wait_vmhive_pair(hive: Hive) -> None:
    for name, ip in zip(("tp1", "tp2"), VMHIVE_IPS, strict=True):
        hive.wait_ready(name, BOOT_DEADLINE)
        wait_lease(hive, name, ip)


def wait_lease(hive: Hive, name: str, ip: str) -> None:
    wait_for(lambda: hive.vm(name)["nics"][0]["ip"] == ip, 120, f"{name}'s DHCP lease of {ip}",
             interval=0.5)  # fmt: skip


# ---------------------------------------------------------------------------
# by hand


def build_hand_network(ns: Netns) -> None:
    ns.run("ip", "link", "add", HAND_BRIDGE, "type", "bridge")
    ns.run("ip", "addr", "add", HAND_BRIDGE_ADDRESS, "dev", HAND_BRIDGE)
    ns.run("ip", "link", "set", HAND_BRIDGE, "up")
    for tap in HAND_TAPS:
        ns.run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        ns.run("ip", "link", "set", tap, "master", HAND_BRIDGE)
        ns.run("ip", "link", "set", tap, "up")


def hand_argv(hive: Hive, name: str, hand_dir: Path, tap: str, image: Path) -> list[str]:
    """The argv vmhive started `name` with, on `hand_dir`'s files and TAP `tap`."""
    vm = hive.vm(name)
    run_dir = hive.data_dir / "run" / vm["uuid"]
    disk = Path(vm["disks"][0]["path"])  # next to it: the UEFI variables
    argv: list[str] = json.loads((run_dir / "runtime.json").read_text())["argv"]
    hand_dir.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image),
                    str(hand_dir / disk.name)], check=True)  # fmt: skip
    shutil.copyfile(OVMF_VARS, hand_dir / "OVMF_VARS.fd")
    argv = [
        re.sub(r"\bifname=[^,]+", f"ifname={tap}", a)
        .replace(str(run_dir), str(hand_dir))
        .replace(str(disk.parent), str(hand_dir))
        for a in argv
    ]
    left = [a for a in argv if str(hive.data_dir) in a]
    if left:
        raise RuntimeError(f"the argv still names vmhive's files: {left}")
    return argv


async def set_running(qmp_sockets: list[Path], running: bool) -> None:
    for path in qmp_sockets:
        monitor = QmpMonitor("bench")
        await monitor.connect(path)
        await (monitor.cont() if running else monitor.stop())
        await monitor.close()


class HandPair:
    """Two QEMUs started by hand in `ns`, on the plain bridge."""

    def __init__(self, ns: Netns, argvs: list[tuple[list[str], Path]]) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.consoles: list[SerialConsole] = []
        self.qmp = [hand_dir / "qmp.sock" for _, hand_dir in argvs]
        for argv, hand_dir in argvs:
            _, proc = asyncio.run(launch_by_hand(ns.argv(*argv), hand_dir))
            self.processes.append(proc)
            self.consoles.append(SerialConsole(hand_dir / "serial.sock"))

    def configure(self) -> None:
        """Boot, then static addresses (nothing answers the guests' DHCP client)."""
        for console in self.consoles:
            console.read_until(READY, BOOT_DEADLINE)
        for console, ip in zip(self.consoles, HAND_IPS, strict=True):
            console.run(f"kill $(cat /run/udhcpc/eth0.pid); ip -4 addr flush dev eth0; "
                        f"ip addr add {ip}/24 dev eth0; ip link set eth0 up")  # fmt: skip

    def pair(self) -> Pair:
        sender, receiver = self.consoles
        return Pair(
            label="by hand",
            sender=sender.run,
            receiver=receiver.run,
            receiver_ip=HAND_IPS[1],
            pause=lambda: asyncio.run(set_running(self.qmp, False)),
            resume=lambda: asyncio.run(set_running(self.qmp, True)),
            qemu_pids=[proc.pid for proc in self.processes],  # `ip netns exec` execs QEMU
        )

    def close(self) -> None:
        for console in self.consoles:
            console.close()
        for proc in self.processes:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------


def bridge_netfilter(ns: Netns) -> str:
    """Whether bridged IPv4 (on both bridges alike) passes the namespace's inet hooks."""
    key = "net/bridge/bridge-nf-call-iptables"
    found = ns.run("cat", f"/proc/sys/{key}", check=False)
    return f"{key}={found.stdout.strip() if found.returncode == 0 else 'absent'}"


def check_reachable(pair: Pair) -> None:
    out = pair.sender(f"ping -c 1 -W 5 {pair.receiver_ip} >/dev/null 2>&1; echo ping $?", 30)
    if field(out, "ping") != "0":
        raise RuntimeError(f"{pair.label}: VM 1 cannot ping {pair.receiver_ip}")


def measure(pair: Pair, count: int) -> Transfer:
    pair.resume()
    try:
        return transfer(pair, count)
    finally:
        pair.pause()


def summarize(ours: list[Transfer], theirs: list[Transfer]) -> None:
    def median(runs: list[Transfer], key: Callable[[Transfer], float]) -> float:
        return statistics.median(map(key, runs))

    for label, runs in (("vmhive", ours), ("by hand", theirs)):
        rates = [t.rate for t in runs]
        print(f"{label:8} median {statistics.median(rates):5.2f} MiB/s (min {min(rates):.2f}, "
              f"max {max(rates):.2f}); host clock {median(runs, lambda t: t.host_rate):.2f} MiB/s; "
              f"QEMU CPU {median(runs, lambda t: t.cpu_per_mib):.0f} ms/MiB")  # fmt: skip

    def ratio(key: Callable[[Transfer], float]) -> float:
        return median(ours, key) / median(theirs, key)

    disagree = sum(not t.clocks_agree for t in ours + theirs)
    if disagree:
        print(f"(!) {disagree} run(s) where the host's time is not the guest's plus at most "
              f"{CLOCK_SLACK} s (the console's round trip)")  # fmt: skip
    paired = statistics.median(a.rate / b.rate for a, b in zip(ours, theirs, strict=True))
    print(f"vmhive / by hand: throughput {ratio(lambda t: t.rate):.3f} (host clock "
          f"{ratio(lambda t: t.host_rate):.3f}, median of the runs' ratios {paired:.3f}); "
          f"CPU per MiB {ratio(lambda t: t.cpu_per_mib):.3f}")  # fmt: skip


def run_benchmark(
    ns: Netns, hive: Hive, image: Path, hand_root: Path, args: argparse.Namespace
) -> None:
    ours = vmhive_pair(hive)
    build_hand_network(ns)
    argvs = [
        (hand_argv(hive, name, hand_root / name, tap, image), hand_root / name)
        for name, tap in zip(("tp1", "tp2"), HAND_TAPS, strict=True)
    ]
    hand = HandPair(ns, argvs)
    try:
        hand.configure()
        wait_vmhive_pair(hive)
        theirs = hand.pair()
        for pair in (ours, theirs):
            check_reachable(pair)
            pair.pause()
        # Warm-up on both; the vmhive one also sizes the transfers.
        probe = measure(ours, PROBE_MIB * MIB // BLOCK)
        measure(theirs, PROBE_MIB * MIB // BLOCK)
        mib = args.mib or max(PROBE_MIB, round(probe.rate * args.seconds))
        count = mib * MIB // BLOCK
        print(f"namespace {ns.name}, {bridge_netfilter(ns)}")
        print(f"transfer: {mib} MiB ({count} x 64 KiB), {args.runs} runs each, alternating")
        results: dict[str, list[Transfer]] = {ours.label: [], theirs.label: []}
        for i in range(args.runs):
            # Every other run the other pair goes first, so a drift in the
            # machine's load weighs on both alike.
            for pair in (ours, theirs) if i % 2 == 0 else (theirs, ours):
                results[pair.label].append(measure(pair, count))
            mine, by_hand = results[ours.label][-1], results[theirs.label][-1]
            print(f"run {i + 1:2}: vmhive {mine}  by hand {by_hand}  "
                  f"ratio {mine.rate / by_hand.rate:.3f}", flush=True)  # fmt: skip
    finally:
        hand.close()
    summarize(results[ours.label], results[theirs.label])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of one transfer")
    parser.add_argument("--mib", type=int, default=0, help="transfer size (overrides --seconds)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, TAPs)")
    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE", ".cache/images")).resolve()
    image = images / "tiny.qcow2"
    if not image.exists():
        sys.exit(f"no {image}: build it with .venv/bin/python -m vmhive.guest.tiny {images}")
    ns = Netns(f"vhbench-{random_token()}")
    hive = Hive(images, netns=ns.name)
    net_run_dir = Settings(data_dir=hive.data_dir).net_run_dir
    hand_root = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
    try:
        hive.start()
        run_benchmark(ns, hive, image, hand_root, args)
    finally:
        hive.close()
        # A private network's dnsmasq would live outside the namespace.
        for pid in processes_with_arg_prefix(f"--conf-file={net_run_dir}/"):
            kill_and_wait(pid)
        ns.close()
        shutil.rmtree(net_run_dir, ignore_errors=True)
        shutil.rmtree(hand_root, ignore_errors=True)


if __name__ == "__main__":
    main()
