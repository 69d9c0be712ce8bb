"""Where a new VM goes: filters, then weights, with the reasons kept for `--dry-run`.

Filters drop a node that is offline or drained, lacks free memory, vCPUs
(within the overcommit ratio) or storage, lacks one of the VM's networks or
pools (a shared pool not mounted there), or already runs a VM of the VM's
anti-affinity group. Weights order the rest:
`spread` (the default) prefers the node with the largest share of memory still
free, `pack` the smallest share that still fits, so whole nodes stay empty.
Ties go to the node with fewer VMs, then to the name, so a choice is
repeatable. Pure functions of their inputs: the service gathers the facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

STRATEGIES = ("spread", "pack")
CPU_OVERCOMMIT = 4.0  # vCPUs per host CPU before a node counts as full
MEMORY_RESERVE_MIB = 256  # kept for the host itself and QEMU's own overhead


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mib: int
    storage_bytes: int = 0
    affinity_group: str | None = None
    networks: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    name: str
    online: bool
    drained: bool
    cpus: int
    memory_mib: int
    storage_free_bytes: int
    vcpus_used: int = 0
    memory_used_mib: int = 0
    vms: int = 0
    groups: frozenset[str] = frozenset()
    networks: frozenset[str] | None = None  # None: every network exists there
    pools: frozenset[str] | None = None  # the pools it can use; None: not known, any

    @property
    def memory_free_mib(self) -> int:
        return self.memory_mib - MEMORY_RESERVE_MIB - self.memory_used_mib


@dataclass(frozen=True)
class Considered:
    node: str
    fits: bool
    reason: str  # why it was filtered out, or what its score means
    score: float | None = None


@dataclass(frozen=True)
class Verdict:
    node: str | None
    strategy: str
    considered: list[Considered] = field(default_factory=list)

    def explain(self) -> str:
        if self.node is not None:
            return f"{self.node} ({self.strategy})"
        reasons = "; ".join(f"{c.node}: {c.reason}" for c in self.considered)
        return f"no node fits: {reasons}" if reasons else "no node fits: the cluster has no nodes"


def refusal(demand: Demand, node: Candidate) -> str | None:
    """Why `node` cannot take the VM, or None."""
    if not node.online:
        return "offline (no heartbeat)"
    if node.drained:
        return "drained"
    if demand.memory_mib > node.memory_free_mib:
        return f"needs {demand.memory_mib} MiB of memory, {max(node.memory_free_mib, 0)} MiB free"
    cpu_room = int(node.cpus * CPU_OVERCOMMIT) - node.vcpus_used
    if demand.vcpus > cpu_room:
        return f"needs {demand.vcpus} vCPUs, room for {max(cpu_room, 0)}"
    if demand.storage_bytes > node.storage_free_bytes:
        return f"needs {demand.storage_bytes} bytes of storage, {node.storage_free_bytes} free"
    if node.networks is not None:
        missing = [n for n in demand.networks if n not in node.networks]
        if missing:
            return f"lacks network {', '.join(missing)}"
    if node.pools is not None:
        missing = [p for p in demand.pools if p not in node.pools]
        if missing:
            return f"lacks pool {', '.join(missing)}"
    if demand.affinity_group and demand.affinity_group in node.groups:
        return f"already runs a VM of anti-affinity group {demand.affinity_group}"
    return None


def place(demand: Demand, nodes: Sequence[Candidate], strategy: str = "spread") -> Verdict:
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy must be one of {', '.join(STRATEGIES)}")
    considered: list[Considered] = []
    fitting: list[tuple[float, int, str]] = []
    for node in sorted(nodes, key=lambda n: n.name):
        reason = refusal(demand, node)
        if reason is not None:
            considered.append(Considered(node.name, False, reason))
            continue
        free_share = (node.memory_free_mib - demand.memory_mib) / max(node.memory_mib, 1)
        score = round(free_share if strategy == "spread" else 1.0 - free_share, 4)
        considered.append(
            Considered(node.name, True, f"{node.memory_free_mib} MiB free, {node.vms} VMs", score)
        )
        fitting.append((-score, node.vms, node.name))
    chosen = min(fitting)[2] if fitting else None
    return Verdict(chosen, strategy, considered)
