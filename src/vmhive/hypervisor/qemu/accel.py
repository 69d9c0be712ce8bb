"""Choosing the accelerator by a real probe.

/dev/kvm existing proves little: some hosts (nested or paravirtual KVM) expose
it, yet a stock Linux kernel hangs or QEMU stops with an emulation failure.
So the probe boots the tiny guest's kernel under KVM with a short deadline
and waits for the kernel to reach user space. The verdict is cached per host
boot (keyed by the kernel's boot id), since it cannot change before a reboot.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmhive.hypervisor.qemu.process import host_boot_id

log = logging.getLogger(__name__)

# Printed by the kernel when it hands over to the initramfs' init.
USERSPACE_MARKER = b"Run /init as init process"
PROBE_DEADLINE = 20.0


@dataclass(frozen=True)
class AccelVerdict:
    accel: str  # "kvm" or "tcg"
    kvm_usable: bool
    reason: str
    boot_id: str
    probed_at: float


def probe_kvm(kernel: Path, initrd: Path, *, deadline: float = PROBE_DEADLINE) -> tuple[bool, str]:
    """Boot kernel+initrd under KVM; True when it reaches user space in time."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    with tempfile.TemporaryDirectory(prefix="vmhive-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "host",
            "-m",
            "128M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 loglevel=7 panic=-1",
            "-serial",
            f"file:{serial}",
        ]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                if serial.exists() and USERSPACE_MARKER in serial.read_bytes():
                    return True, "a Linux guest reached user space under KVM"
                if proc.poll() is not None:
                    out = (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")
                    first = out.strip().splitlines()[:1]
                    return False, "QEMU failed under KVM: " + (first[0] if first else "no output")
                time.sleep(0.1)
            return (
                False,
                f"a Linux guest did not reach user space under KVM within {deadline:.0f} s",
            )
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose_accel(
    requested: str, cache_file: Path, kernel: Path | None, initrd: Path | None
) -> AccelVerdict:
    """Resolve --accel auto|kvm|tcg into the accelerator VMs will use."""
    boot_id = host_boot_id()
    if requested == "tcg":
        return AccelVerdict("tcg", False, "TCG requested (--accel tcg)", boot_id, time.time())
    cached = _load(cache_file)
    if cached is not None and cached.boot_id == boot_id:
        verdict = cached
    elif kernel is None or initrd is None or not kernel.exists() or not initrd.exists():
        verdict = AccelVerdict(
            "tcg", False, "KVM not probed: the tiny image's kernel is missing", boot_id, time.time()
        )
    else:
        usable, reason = probe_kvm(kernel, initrd)
        verdict = AccelVerdict("kvm" if usable else "tcg", usable, reason, boot_id, time.time())
        _save(cache_file, verdict)
    if requested == "kvm":
        return AccelVerdict(
            "kvm",
            verdict.kvm_usable,
            "KVM requested (--accel kvm); " + verdict.reason,
            boot_id,
            verdict.probed_at,
        )
    if not verdict.kvm_usable:
        log.warning("KVM is not usable here (%s): VMs run under TCG, 5-10x slower", verdict.reason)
    return verdict


def _load(path: Path) -> AccelVerdict | None:
    try:
        return AccelVerdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _save(path: Path, verdict: AccelVerdict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(verdict)))
