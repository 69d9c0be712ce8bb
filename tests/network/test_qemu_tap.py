"""A real guest on a TAP: QEMU (argv from the argv builder, sandbox on) gets a DHCP lease.

Everything runs in a namespace playing the host: a nat network, a TAP from
`ensure_tap`, the firewall with the TAP's anti-spoofing rules, and QEMU
(TCG) booting the tiny guest directly from its kernel, whose init runs a DHCP
client on every interface.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from tests.network.conftest import NetnsFactory
from tests.network.helpers import wait_until
from vmhive.guest.tiny import DIRECT_BOOT_CMDLINE
from vmhive.hypervisor.qemu.argv import build_argv
from vmhive.hypervisor.spec import Accel, DiskSpec, KernelBoot, NicSpec, RuntimePaths, VmSpec
from vmhive.network import (
    VmPort,
    apply_firewall,
    define_network,
    ensure_network,
    ensure_tap,
    get_link,
    network_leases,
    remove_firewall,
    remove_network,
    remove_tap,
    scan_host,
    tap_name,
)

pytestmark = pytest.mark.network

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
VM_UUID = "6f1c2a3e-0b7d-4c5e-9a1f-0000000000aa"
VM_MAC = "52:54:00:00:00:aa"
LEASE_DEADLINE = 120.0  # a TCG boot takes 2-7 s, more on a loaded machine


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
    path = Path(tempfile.mkdtemp(prefix="vhq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(QEMU is None or QEMU_IMG is None, reason="QEMU is not installed")
def test_guest_gets_a_lease_through_a_tap(
    netns: NetnsFactory, run_dir: Path, vm_dir: Path, tiny_image_dir: Path
) -> None:
    assert QEMU is not None and QEMU_IMG is not None
    host = netns("host")
    net = define_network("lab", "nat", subnet="10.77.6.0/24")
    host.call(ensure_network, net, run_dir)
    tap = tap_name(VM_UUID, 0)
    host.call(ensure_tap, tap, bridge=net.bridge, owner=f"vm {VM_UUID} nic 0")
    host.call(apply_firewall, [net], [], [VmPort(tap, VM_MAC, None)])

    disk = vm_dir / "disk0.qcow2"
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(tiny_image_dir / "tiny.qcow2"),
            str(disk),
        ],
        check=True,
        timeout=30,
    )
    run = vm_dir / "run"
    run.mkdir()
    spec = VmSpec(
        name="tapvm",
        uuid=VM_UUID,
        generation=1,
        vcpus=1,
        memory_mib=256,
        machine="pc",
        accel=Accel.TCG,
        runtime=RuntimePaths(run),
        disks=(DiskSpec(disk),),
        nics=(NicSpec(mac=VM_MAC, model="virtio-net-pci", backend="tap", tap=tap),),
        kernel_boot=KernelBoot(
            kernel=tiny_image_dir / "vmlinuz",
            initrd=tiny_image_dir / "initrd.img",
            cmdline=DIRECT_BOOT_CMDLINE,
        ),
    )
    log = (run / "qemu.log").open("w")
    qemu = host.popen(*build_argv(spec, qemu_binary=QEMU), stdout=log, stderr=subprocess.STDOUT)
    try:

        def leased() -> IPv4Address | None:
            assert qemu.poll() is None, (run / "qemu.log").read_text()
            lease = host.call(network_leases, net, run_dir).get(VM_MAC)
            return lease.ipv4 if lease is not None else None

        ip = wait_until(leased, LEASE_DEADLINE, "the guest's DHCP lease")
        assert ip in net.subnet  # type: ignore[operator]
        assert host.call(get_link, tap).up  # type: ignore[union-attr]
        host.call(apply_firewall, [net], [], [VmPort(tap, VM_MAC, ip)])
        assert wait_until(lambda: host.ping(ip), 30, "the guest to answer pings")
        # The sandbox stayed on while QEMU opened /dev/net/tun.
        qemu_pid = int(spec.runtime.pidfile.read_text())
        status = Path(f"/proc/{qemu_pid}/status")
        assert "Seccomp:\t2" in status.read_text()
    finally:
        qemu.kill()
        qemu.wait()
        log.close()
    host.call(remove_tap, tap)
    host.call(remove_network, net, run_dir)
    host.call(remove_firewall)
    assert host.call(scan_host, run_dir).empty
