"""Prometheus exposition: checked by the real `promtool check metrics`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmhive.hypervisor.base import DiskCounters, NicCounters, VmStats
from vmhive.metrics.host import read_host
from vmhive.metrics.prometheus import Exposition, VmView, escape_label_value, render


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def assert_promtool_accepts(text: str) -> None:
    result = promtool_check(text)
    assert result.returncode == 0, f"promtool: {result.stdout}{result.stderr}\n{text}"


STATS = VmStats(
    pid=4242,
    vcpus=2,
    cpu_seconds=12.5,
    memory_bytes=300 << 20,
    disks=(DiskCounters("disk0", 5 << 20, 1 << 20, 700, 90), DiskCounters("disk1", 1, 2, 3, 4)),
    nics=(NicCounters("net0", 1000, 2000, 10, 20),),
    uncounted_nics=("net1",),
)


def test_a_full_exposition_passes_promtool() -> None:
    odd = 'we"ird\\name\nwith newline'
    text = render(
        read_host([Path("/")]),
        [VmView(odd, "u-1", True, STATS), VmView("idle", "u-2", False, None)],
        0.0042,
    )
    assert_promtool_accepts(text)
    assert (
        'vmhive_vm_cpu_seconds_total{vm="we\\"ird\\\\name\\nwith newline",uuid="u-1"} 12.5' in text
    )
    assert 'vmhive_vm_disk_read_bytes_total{vm="we\\"ird' in text
    assert ',disk="disk1"} 1\n' in text
    assert (
        'vmhive_vm_network_transmit_bytes_total{vm="we\\"ird\\\\name\\nwith newline",uuid="u-1",nic="net0"} 2000'
        in text
    )
    assert 'vmhive_vm_running{vm="idle",uuid="u-2"} 0' in text
    # Each family is one block: HELP, TYPE, then all its samples.
    lines = text.splitlines()
    assert lines.count("# TYPE vmhive_vm_running gauge") == 1
    running = [i for i, line in enumerate(lines) if line.startswith("vmhive_vm_running{")]
    assert running == list(range(running[0], running[0] + 2))


def test_promtool_catches_what_we_guard_against() -> None:
    """The check is real: promtool rejects the mistakes the renderer avoids."""
    assert promtool_check('# HELP a x\n# TYPE a counter\na{v="x\ny"} 1\n').returncode != 0
    assert promtool_check("# HELP c x\n# TYPE c counter\nc 1\n").returncode != 0


def test_exposition_refuses_misnamed_or_retyped_families() -> None:
    out = Exposition()
    with pytest.raises(ValueError, match="must end in _total"):
        out.add("reads", "counter", "x", 1)
    out.add("things_total", "counter", "x", 1)
    with pytest.raises(ValueError, match="is a counter"):
        out.add("things_total", "gauge", "x", 1)


def test_escaping() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert_promtool_accepts(render(None, [], 0.0))
