"""Prometheus text exposition (format 0.0.4) of the latest sample.

Counters are exported as the raw cumulative values (Prometheus computes rates
and handles the reset of a restarted VM); gauges as they are. Every family has
its HELP and TYPE lines and its samples together, as `promtool check metrics`
demands.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmhive.hypervisor.base import VmStats
from vmhive.metrics.host import HostCounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    r"""Backslash, double quote and line feed escaped, as the format requires.

    >>> print(escape_label_value('a"b\\c\nd'))
    a\"b\\c\nd
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """
    >>> format_value(3), format_value(0.25), format_value(float("nan")), format_value(1e21)
    ('3', '0.25', 'NaN', '1e+21')
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class _Family:
    kind: str
    help: str
    samples: list[str] = field(default_factory=list)


class Exposition:
    """Collects samples by family, in the order families first appear."""

    def __init__(self, prefix: str = "vmhive_") -> None:
        self.prefix = prefix
        self._families: dict[str, _Family] = {}

    def add(
        self, name: str, kind: str, help: str, value: float, labels: Mapping[str, str] = {}
    ) -> None:
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        full = self.prefix + name
        family = self._families.setdefault(full, _Family(kind, help))
        if family.kind != kind:
            raise ValueError(f"{full} is a {family.kind}, not a {kind}")
        label_text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
        selector = f"{full}{{{label_text}}}" if label_text else full
        family.samples.append(f"{selector} {format_value(value)}")

    def render(self) -> str:
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            lines.extend(family.samples)
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class VmView:
    """What /metrics says about one VM: its identity and its latest counters."""

    name: str
    uuid: str
    running: bool
    stats: VmStats | None


def render(host: HostCounters | None, vms: Iterable[VmView], sample_seconds: float) -> str:
    out = Exposition()
    if host is not None:
        out.add("host_cpus", "gauge", "Logical CPUs of the host.", host.cpus)
        for mode, seconds in (("busy", host.cpu_busy_seconds), ("idle", host.cpu_idle_seconds)):
            out.add(
                "host_cpu_seconds_total",
                "counter",
                "CPU time of all host CPUs since boot; idle includes iowait.",
                seconds,
                {"mode": mode},
            )
        out.add("host_memory_total_bytes", "gauge", "Host memory.", host.memory_total_bytes)
        out.add(
            "host_memory_used_bytes",
            "gauge",
            "Host memory in use (total minus available).",
            host.memory_used_bytes,
        )
        out.add(
            "host_storage_total_bytes",
            "gauge",
            "Size of the filesystems of the data and image directories.",
            host.storage_total_bytes,
        )
        out.add(
            "host_storage_used_bytes",
            "gauge",
            "Space used on the filesystems of the data and image directories.",
            host.storage_used_bytes,
        )
    for vm in vms:
        _render_vm(out, vm)
    out.add(
        "metrics_sample_duration_seconds",
        "gauge",
        "How long the last sampling of the host and every VM took.",
        sample_seconds,
    )
    return out.render()


def _render_vm(out: Exposition, vm: VmView) -> None:
    ids = {"vm": vm.name, "uuid": vm.uuid}
    out.add("vm_running", "gauge", "1 if the VM's QEMU runs, else 0.", int(vm.running), ids)
    stats = vm.stats
    if stats is None:
        return
    out.add("vm_vcpus", "gauge", "Virtual CPUs of the VM.", stats.vcpus, ids)
    out.add(
        "vm_cpu_seconds_total",
        "counter",
        "CPU time (user + system) of the VM's QEMU process.",
        stats.cpu_seconds,
        ids,
    )
    out.add(
        "vm_memory_resident_bytes",
        "gauge",
        "Resident memory of the VM's QEMU process.",
        stats.memory_bytes,
        ids,
    )
    for disk in stats.disks:
        labels = {**ids, "disk": disk.name}
        for name, help, value in (
            ("vm_disk_read_bytes_total", "Bytes read by the guest from the disk.", disk.read_bytes),
            (
                "vm_disk_written_bytes_total",
                "Bytes written by the guest to the disk.",
                disk.write_bytes,
            ),
            ("vm_disk_reads_total", "Read operations of the guest on the disk.", disk.read_ops),
            ("vm_disk_writes_total", "Write operations of the guest on the disk.", disk.write_ops),
        ):
            out.add(name, "counter", help, value, labels)
    for nic in stats.nics:
        labels = {**ids, "nic": nic.name}
        for name, help, value in (
            ("vm_network_receive_bytes_total", "Bytes received by the guest.", nic.rx_bytes),
            ("vm_network_transmit_bytes_total", "Bytes sent by the guest.", nic.tx_bytes),
            ("vm_network_receive_packets_total", "Packets received by the guest.", nic.rx_packets),
            ("vm_network_transmit_packets_total", "Packets sent by the guest.", nic.tx_packets),
        ):
            out.add(name, "counter", help, value, labels)
