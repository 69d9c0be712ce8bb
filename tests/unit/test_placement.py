"""Placement: filters with their reasons, spread and pack, anti-affinity, ties."""

from __future__ import annotations

import pytest

from vmhive.services.placement import MEMORY_RESERVE_MIB, Candidate, Demand, place


def node(name: str, memory_used: int = 0, **kw: object) -> Candidate:
    facts: dict[str, object] = {
        "online": True,
        "drained": False,
        "cpus": 4,
        "memory_mib": 8192,
        "storage_free_bytes": 100 << 30,
        "memory_used_mib": memory_used,
    }
    facts.update(kw)
    return Candidate(name=name, **facts)  # type: ignore[arg-type]


def test_spread_prefers_the_emptiest_and_pack_the_fullest() -> None:
    nodes = [node("a", 1024), node("b", 4096), node("c", 0)]
    demand = Demand(vcpus=1, memory_mib=512)
    assert place(demand, nodes).node == "c"
    assert place(demand, nodes, "pack").node == "b"


def test_filters_give_reasons() -> None:
    nodes = [
        node("down", online=False),
        node("drained", drained=True),
        node("full", 8192 - MEMORY_RESERVE_MIB - 100),
        node("busy", vcpus_used=16),
        node("small-disk", storage_free_bytes=1 << 20),
        node("nonet", networks=frozenset({"other"})),
        node("grouped", groups=frozenset({"web"})),
    ]
    demand = Demand(
        vcpus=1, memory_mib=512, storage_bytes=1 << 30, affinity_group="web", networks=("lan",)
    )
    verdict = place(demand, nodes)
    assert verdict.node is None
    reasons = {c.node: c.reason for c in verdict.considered}
    assert reasons["down"] == "offline (no heartbeat)"
    assert reasons["drained"] == "drained"
    assert reasons["full"] == "needs 512 MiB of memory, 100 MiB free"
    assert reasons["busy"] == "needs 1 vCPUs, room for 0"
    assert reasons["small-disk"].startswith("needs 1073741824 bytes of storage")
    assert reasons["nonet"] == "lacks network lan"
    assert reasons["grouped"] == "already runs a VM of anti-affinity group web"
    assert verdict.explain().startswith("no node fits: busy: needs 1 vCPUs")


def test_anti_affinity_spreads_a_group_over_nodes() -> None:
    nodes = [node("a", groups=frozenset({"db"})), node("b", 6000), node("c", 0)]
    verdict = place(Demand(vcpus=1, memory_mib=256, affinity_group="db"), nodes)
    assert verdict.node == "c"
    assert not next(c for c in verdict.considered if c.node == "a").fits


def test_ties_go_to_fewer_vms_then_name() -> None:
    assert place(Demand(1, 256), [node("b", vms=1), node("a", vms=2)]).node == "b"
    assert place(Demand(1, 256), [node("b"), node("a")]).node == "a"


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="spread, pack"):
        place(Demand(1, 256), [node("a")], "random")
