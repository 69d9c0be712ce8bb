"""Host facts: QEMU version, pinned machine types, firmware, accelerator."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from vmhive.hypervisor.qemu.accel import AccelVerdict
from vmhive.store.db import insert_if_absent
from vmhive.store.models import Setting

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

# The alias QEMU resolves to its newest versioned machine type, per generation.
GENERATION_MACHINE_ALIAS = {1: "pc", 2: "q35"}


@dataclass
class HostInfo:
    qemu_version: str
    machines: dict[int, str]
    accel: AccelVerdict
    unowned_processes: dict[int, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "hostname": os.uname().nodename,
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "memory_mib": _mem_total_mib(),
            "qemu_version": self.qemu_version,
            "machine_types": {f"gen{g}": m for g, m in self.machines.items()},
            "accel": self.accel.accel,
            "kvm_usable": self.accel.kvm_usable,
            "accel_reason": self.accel.reason,
            "firmware": {"ovmf_code": str(OVMF_CODE), "ovmf_vars": str(OVMF_VARS)},
            "unowned_qemu_processes": [
                {"pid": pid, "argv": argv} for pid, argv in sorted(self.unowned_processes.items())
            ],
        }


def _mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


async def _qemu_output(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode()


async def qemu_version() -> str:
    out = await _qemu_output("--version")
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "unknown"


def resolve_alias(machine_help: str, alias: str) -> str:
    """The versioned machine type behind an alias in `-machine help` output.

    >>> resolve_alias("pc   Standard PC (alias of pc-i440fx-7.2)", "pc")
    'pc-i440fx-7.2'
    """
    for line in machine_help.splitlines():
        name, _, rest = line.partition(" ")
        match = re.search(r"\(alias of (\S+)\)", rest)
        if name == alias and match:
            return match.group(1)
    raise RuntimeError(f"QEMU has no machine type alias {alias!r}")


async def pinned_machines(sessions: async_sessionmaker[Any]) -> dict[int, str]:
    """Machine types pinned at first start, so a QEMU upgrade keeps VMs' hardware."""
    machines: dict[int, str] = {}
    async with sessions() as session:
        help_text: str | None = None
        for generation, alias in GENERATION_MACHINE_ALIAS.items():
            key = f"machine.gen{generation}"
            row = await session.get(Setting, key)
            if row is None:
                help_text = help_text or await _qemu_output("-machine", "help")
                # Another host of a shared database may pin it first: its value wins.
                await insert_if_absent(
                    session, Setting, key=key, value=resolve_alias(help_text, alias)
                )
                row = await session.get(Setting, key)
                assert row is not None
            machines[generation] = row.value
        await session.commit()
    return machines
