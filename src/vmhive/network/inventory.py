"""What vmhive has on this host, for cleanup: list it, diff it against what you own.

`scan_host` reports every ``vh-`` device (by kind), vmhive's nftables tables
and every dnsmasq that belongs to a network directory under the run
directory: directories holding dnsmasq files, and running dnsmasqs found by
their command line (even when their files are gone). Nothing
here changes the host; remove leftovers with `links.remove_link`,
`links.remove_tap`, `dnsmasq.stop_dnsmasq`, `firewall.remove_firewall` or
`networks.remove_network`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmhive.network.dnsmasq import DNSMASQ, scan_dnsmasq_processes
from vmhive.network.dnsmasq_config import DnsmasqPaths
from vmhive.network.firewall import firewall_tables
from vmhive.network.links import LinkInfo, list_links
from vmhive.network.names import BRIDGE_PREFIX, DHCP_VETH_PREFIX, TAP_PREFIX, is_vmhive_ifname


@dataclass(frozen=True)
class DnsmasqInstance:
    """A network directory with dnsmasq files; `pid` is set while its dnsmasq runs."""

    network: str  # the directory's name, which is the network's name
    paths: DnsmasqPaths
    pid: int | None


@dataclass(frozen=True)
class HostInventory:
    bridges: tuple[LinkInfo, ...]
    taps: tuple[LinkInfo, ...]
    dhcp_veths: tuple[LinkInfo, ...]
    other_links: tuple[LinkInfo, ...]  # vh- devices of no known kind
    nft_tables: tuple[str, ...]  # e.g. "inet vmhive"
    dnsmasq: tuple[DnsmasqInstance, ...]

    @property
    def empty(self) -> bool:
        return not (
            self.bridges
            or self.taps
            or self.dhcp_veths
            or self.other_links
            or self.nft_tables
            or any(d.pid is not None for d in self.dnsmasq)
        )


def _dnsmasq_dirs(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(
        entry for entry in run_dir.iterdir() if entry.is_dir() and any(entry.glob("dnsmasq.*"))
    )


def scan_host(run_dir: Path, *, dnsmasq: str = DNSMASQ) -> HostInventory:
    """Everything vmhive-named on this host (network namespace), and dnsmasqs under `run_dir`."""
    bridges, taps, veths, others = [], [], [], []
    for link in sorted(list_links(), key=lambda link: link.name):
        if not is_vmhive_ifname(link.name):
            continue
        if link.name.startswith(BRIDGE_PREFIX) and link.kind == "bridge":
            bridges.append(link)
        elif link.name.startswith(TAP_PREFIX) and link.is_tap:
            taps.append(link)
        elif link.name.startswith(DHCP_VETH_PREFIX) and link.kind == "veth":
            veths.append(link)
        else:
            others.append(link)
    run_dir = Path(run_dir).absolute()
    running = scan_dnsmasq_processes(run_dir, dnsmasq)
    instances = [
        DnsmasqInstance(directory.name, DnsmasqPaths(directory), running.get(directory))
        for directory in sorted(set(_dnsmasq_dirs(run_dir)) | set(running))
    ]
    return HostInventory(
        bridges=tuple(bridges),
        taps=tuple(taps),
        dhcp_veths=tuple(veths),
        other_links=tuple(others),
        nft_tables=tuple(firewall_tables()),
        dnsmasq=tuple(instances),
    )
