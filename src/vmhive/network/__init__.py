"""Host plumbing of vmhive's virtual switches: bridges, TAPs, nftables and dnsmasq.

The services layer describes what it wants with plain data (`Network`,
`PortForward`, `VmPort`, `DhcpReservation`) and calls:

* `ensure_network` / `remove_network`: a network's bridge, host address,
  uplink and dnsmasq (`networks`);
* `ensure_tap` / `remove_tap` / `set_link_up`: a VM NIC's TAP device
  (`links`), which QEMU then opens by name;
* `apply_firewall` / `remove_firewall`: the whole vmhive nftables ruleset,
  replaced atomically (`firewall`; `render_ruleset` is its pure core);
* `update_reservations` / `network_leases`: static DHCP leases, and who got
  which address;
* `choose_subnet` / `check_subnet` with `host_used_networks`: subnets that
  collide with nothing on the host (`subnets`);
* `scan_host`: everything vmhive-named on the host, to clean up leftovers
  (`inventory`).

Every ``ensure_*`` and ``remove_*`` call is idempotent, and a multi-step
``ensure_*`` that fails undoes its own changes. Errors are `NetworkError`
subclasses with one-line messages. All calls block (netlink, subprocesses,
waits with deadlines): from asyncio code run them with ``asyncio.to_thread``,
and serialize the calls that concern one network or one TAP.

Private networks: the host has no address on their bridge and no route to
them, so their dnsmasq runs in a network namespace of its own, created for it
and linked to the bridge by a veth (``vh-d<key>``); the namespace has no name
and dies with dnsmasq, taking the veth along (see `nsexec`).

Everything acts on the network namespace of the calling process, which is
how the tests (and a cluster simulated on one machine) run it in namespaces.
"""

from __future__ import annotations

from vmhive.network.errors import (
    DnsmasqError,
    FirewallError,
    LinkConflictError,
    LinkError,
    NetworkConfigError,
    NetworkError,
    NoFreeSubnetError,
    SubnetConflictError,
)
from vmhive.network.firewall import (
    apply_firewall,
    apply_ruleset,
    firewall_tables,
    remove_firewall,
    render_ruleset,
)
from vmhive.network.inventory import DnsmasqInstance, HostInventory, scan_host
from vmhive.network.links import (
    LinkInfo,
    attach_to_bridge,
    ensure_tap,
    get_link,
    remove_link,
    remove_tap,
    set_link_up,
)
from vmhive.network.model import (
    DhcpReservation,
    Lease,
    Network,
    NetworkType,
    PortForward,
    VmPort,
    define_network,
    validate_network,
)
from vmhive.network.names import bridge_name, tap_name
from vmhive.network.networks import (
    NetworkState,
    ensure_network,
    network_leases,
    remove_network,
    update_reservations,
)
from vmhive.network.subnets import (
    DEFAULT_POOLS,
    UsedNetwork,
    check_subnet,
    choose_subnet,
    host_used_networks,
)

__all__ = [
    "DEFAULT_POOLS",
    "DhcpReservation",
    "DnsmasqError",
    "DnsmasqInstance",
    "FirewallError",
    "HostInventory",
    "Lease",
    "LinkConflictError",
    "LinkError",
    "LinkInfo",
    "Network",
    "NetworkConfigError",
    "NetworkError",
    "NetworkState",
    "NetworkType",
    "NoFreeSubnetError",
    "PortForward",
    "SubnetConflictError",
    "UsedNetwork",
    "VmPort",
    "apply_firewall",
    "apply_ruleset",
    "attach_to_bridge",
    "bridge_name",
    "check_subnet",
    "choose_subnet",
    "define_network",
    "ensure_network",
    "ensure_tap",
    "firewall_tables",
    "get_link",
    "host_used_networks",
    "network_leases",
    "remove_firewall",
    "remove_link",
    "remove_network",
    "remove_tap",
    "render_ruleset",
    "scan_host",
    "set_link_up",
    "tap_name",
    "update_reservations",
    "validate_network",
]
