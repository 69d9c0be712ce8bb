"""vmhive's nftables ruleset: rendered from plain data, applied in one transaction.

vmhive owns two tables, ``inet vmhive`` and ``bridge vmhive``, and nothing
else: its base chains have policy accept and only decide about vmhive's own
bridges, so the host's other rules (and other tables' drops) keep working.
`render_ruleset` is a pure function of the networks, port forwards and VM
ports; the text it returns first creates-then-deletes both tables and then
declares them anew, so ``nft -f -`` swaps the whole ruleset atomically (an
error leaves the previous ruleset in place).

``inet vmhive``:

* postrouting: a ``nat`` subnet is masqueraded towards anything outside it (no
  uplink is named: whatever route the host takes). Port-forwarded connections
  from 127.0.0.0/8 and hairpin connections (a VM to a forwarded port of its own
  network) are masqueraded to the gateway too, so the VM's answer comes back
  through the host.
* prerouting and output: port forwards, as DNAT of connections to a local
  address of the host (``fib daddr type local``) or to the forward's
  `host_ip`. The output chain covers connections the host makes itself, to
  127.0.0.1 included: `apply_firewall` sets ``route_localnet`` on nat bridges
  so such packets may leave through them, and the input chain drops packets
  that arrive on those bridges for 127.0.0.0/8 in the original direction
  (the guard Kubernetes added for CVE-2020-8558).
  A VM reaching its *own* forwarded port through the host's address fails while
  br_netfilter is loaded: the DNATed frame is bridged straight back to the port it
  came from, which a bridge never does (other VMs of the network get through).
* forward: traffic within one bridge passes (bridged frames reach this hook
  when br_netfilter is loaded); ``internal`` and ``private`` bridges forward
  nothing else, not even to a published port; a ``nat`` network's VMs may open
  connections to anywhere but another vmhive network, and receive answers and
  port-forwarded connections (from outside or from other nat networks, as
  anyone who can reach the host's address may); everything else to or from a
  vmhive bridge is dropped.
* input and output: the host neither receives from nor sends to a ``private``
  bridge (defense in depth: it has no address there anyway).

``bridge vmhive`` (anti-spoofing, at bridge prerouting, per VM port): a frame
from a VM port must carry the port's MAC as source; ARP must claim that MAC;
VLAN-tagged frames and DHCP server replies are dropped; once the VM's IPv4
address is known, IPv4 must come from it (or be a DHCP request from 0.0.0.0)
and ARP must claim it (or 0.0.0.0, for address probes). IPv6 is left alone
apart from the MAC check (vmhive networks are IPv4; external LANs may do
SLAAC, which cannot be pinned in advance).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network
from typing import Final

from vmhive.network import links
from vmhive.network.errors import FirewallError, NetworkConfigError, SubnetConflictError
from vmhive.network.model import (
    ROUTED_TYPES,
    Network,
    NetworkType,
    PortForward,
    VmPort,
    validate_network,
    validate_port_forward,
    validate_vm_port,
)

TABLE: Final = "vmhive"
FAMILIES: Final = ("inet", "bridge")
NFT: Final = "/usr/sbin/nft"
NFT_TIMEOUT: Final = 30.0
_LOOPBACK: Final = IPv4Network("127.0.0.0/8")


def _q(name: str) -> str:
    """An interface name as an nft string literal (names are validated to need no escaping)."""
    return f'"{name}"'


def _set(names: Sequence[str]) -> str:
    return _q(names[0]) if len(names) == 1 else "{ " + ", ".join(_q(n) for n in names) + " }"


def _chain(name: str, hook: str | None, rules: list[str]) -> list[str]:
    lines = [f"\tchain {name} {{"]
    if hook is not None:
        lines.append(f"\t\t{hook}")
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def _check_inputs(
    networks: Sequence[Network], forwards: Sequence[PortForward], ports: Sequence[VmPort]
) -> None:
    names: set[str] = set()
    bridges: dict[str, str] = {}
    subnets: list[tuple[IPv4Network, str]] = []
    for net in networks:
        validate_network(net)
        if net.name in names:
            raise NetworkConfigError(f"network {net.name} is listed twice")
        names.add(net.name)
        if net.bridge in bridges:
            raise NetworkConfigError(
                f"networks {bridges[net.bridge]} and {net.name} share bridge {net.bridge}"
            )
        bridges[net.bridge] = net.name
        if net.subnet is not None:
            for other, other_name in subnets:
                if net.subnet.overlaps(other):
                    raise SubnetConflictError(
                        f"network {net.name} ({net.subnet}) overlaps network {other_name} ({other})"
                    )
            subnets.append((net.subnet, net.name))
    by_name = {net.name: net for net in networks}
    seen: dict[tuple[str, int], list[PortForward]] = {}
    for fwd in forwards:
        validate_port_forward(fwd, by_name)
        for prior in seen.get((fwd.proto, fwd.host_port), []):
            if prior.host_ip is None or fwd.host_ip is None or prior.host_ip == fwd.host_ip:
                raise NetworkConfigError(
                    f"host port {fwd.proto}/{fwd.host_port} is forwarded twice "
                    f"({prior.vm_ip}:{prior.vm_port} and {fwd.vm_ip}:{fwd.vm_port})"
                )
        seen.setdefault((fwd.proto, fwd.host_port), []).append(fwd)
    taps: set[str] = set()
    for port in ports:
        validate_vm_port(port)
        if port.tap in taps:
            raise NetworkConfigError(f"VM port {port.tap} is listed twice")
        taps.add(port.tap)


def _forward_rule(fwd: PortForward) -> str:
    where = f"ip daddr {fwd.host_ip}" if fwd.host_ip is not None else "fib daddr type local"
    return (
        f"meta nfproto ipv4 {where} {fwd.proto} dport {fwd.host_port} "
        f'dnat ip to {fwd.vm_ip}:{fwd.vm_port} comment "network {fwd.network}"'
    )


def _inet_table(networks: Sequence[Network], forwards: Sequence[PortForward]) -> list[str]:
    routed = [n for n in networks if n.type in ROUTED_TYPES]
    nat = [n for n in routed if n.type == NetworkType.NAT]
    private = [n for n in routed if n.type == NetworkType.PRIVATE]

    dnat = [
        _forward_rule(f)
        for f in sorted(forwards, key=lambda f: (f.proto, f.host_port, str(f.host_ip)))
    ]
    snat: list[str] = []
    for net in nat:
        bridge = _q(net.bridge)
        snat += [
            f'ip saddr {net.subnet} ip daddr != {net.subnet} masquerade comment "network {net.name}"',
            f"oifname {bridge} ip saddr {_LOOPBACK} masquerade",
            f"oifname {bridge} ip saddr {net.subnet} ct status dnat masquerade",
        ]

    closed = [n for n in routed if n.type != NetworkType.NAT]
    forward: list[str] = [f"iifname {_q(n.bridge)} oifname {_q(n.bridge)} accept" for n in routed]
    for net in closed:  # internal and private: nothing routed in or out, published ports included
        forward += [f"iifname {_q(net.bridge)} drop", f"oifname {_q(net.bridge)} drop"]
    for net in nat:
        forward += [
            f"oifname {_q(net.bridge)} ct state established,related accept",
            f"oifname {_q(net.bridge)} ct status dnat accept",
        ]
    for net in nat:
        others = sorted(n.bridge for n in nat if n is not net)
        if others:
            forward.append(f"iifname {_q(net.bridge)} oifname {_set(others)} drop")
    forward += [f"iifname {_q(n.bridge)} ip saddr {n.subnet} accept" for n in nat]
    for net in nat:
        forward += [f"iifname {_q(net.bridge)} drop", f"oifname {_q(net.bridge)} drop"]

    inbound: list[str] = []
    if nat:
        inbound.append(
            f"iifname {_set([n.bridge for n in nat])} ip daddr {_LOOPBACK} ct direction original drop"
        )
    if private:
        inbound.append(f"iifname {_set([n.bridge for n in private])} drop")
    outbound = [f"oifname {_set([n.bridge for n in private])} drop"] if private else []

    lines = [f"table inet {TABLE} {{"]
    if dnat:
        lines += _chain(
            "prerouting_nat", "type nat hook prerouting priority dstnat; policy accept;", dnat
        )
        lines += _chain("output_nat", "type nat hook output priority -100; policy accept;", dnat)
    if snat:
        lines += _chain(
            "postrouting_nat", "type nat hook postrouting priority srcnat; policy accept;", snat
        )
    if forward:
        lines += _chain(
            "forward", "type filter hook forward priority filter; policy accept;", forward
        )
    if inbound:
        lines += _chain("input", "type filter hook input priority filter; policy accept;", inbound)
    if outbound:
        lines += _chain(
            "output", "type filter hook output priority filter; policy accept;", outbound
        )
    lines.append("}")
    return lines


def _port_rules(port: VmPort) -> list[str]:
    rules = [
        f"ether saddr != {port.mac} drop",
        "ether type { 8021q, 8021ad } drop",
        f"ether type arp arp saddr ether != {port.mac} drop",
        "ether type ip udp sport 67 drop",
    ]
    if port.ipv4 is not None:
        rules += [
            f"ether type arp arp saddr ip != {{ 0.0.0.0, {port.ipv4} }} drop",
            f"ip saddr {port.ipv4} accept",
            "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
            "ether type ip drop",
        ]
    return rules


def _bridge_table(ports: Sequence[VmPort]) -> list[str]:
    ordered = sorted(ports, key=lambda p: p.tap)
    vmap = ", ".join(f"{_q(p.tap)} : jump port-{p.tap}" for p in ordered)
    lines = [f"table bridge {TABLE} {{"]
    lines += _chain(
        "prerouting",
        "type filter hook prerouting priority filter; policy accept;",
        [f"iifname vmap {{ {vmap} }}"],
    )
    for port in ordered:
        lines += _chain(f"port-{port.tap}", None, _port_rules(port))
    lines.append("}")
    return lines


def render_ruleset(
    networks: Iterable[Network],
    forwards: Iterable[PortForward] = (),
    ports: Iterable[VmPort] = (),
) -> str:
    """The complete vmhive ruleset, as input for ``nft -f -`` (see the module docstring).

    With nothing to enforce, the text only deletes vmhive's tables. Raises
    `NetworkConfigError` for invalid or conflicting input.
    """
    nets, fwds, vm_ports = list(networks), list(forwards), list(ports)
    _check_inputs(nets, fwds, vm_ports)
    lines = ["#!/usr/sbin/nft -f", "# vmhive: generated, do not edit"]
    for family in FAMILIES:
        # Declaring a table first makes deleting it valid whether or not it existed.
        lines += [f"table {family} {TABLE} {{}}", f"delete table {family} {TABLE}"]
    if any(n.type in ROUTED_TYPES for n in nets):
        lines += _inet_table(nets, fwds)
    if vm_ports:
        lines += _bridge_table(vm_ports)
    return "".join(f"{line}\n" for line in lines)


def _nft_binary() -> str:
    return shutil.which("nft") or NFT


def apply_ruleset(text: str) -> None:
    """Load `text` with ``nft -f -`` in one transaction; raise `FirewallError` on failure."""
    try:
        result = subprocess.run(
            [_nft_binary(), "-f", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"cannot run nft: {exc}") from None
    if result.returncode != 0:
        message = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
        raise FirewallError(f"nft refused the vmhive ruleset: {message or 'no error message'}")


def apply_firewall(
    networks: Iterable[Network],
    forwards: Iterable[PortForward] = (),
    ports: Iterable[VmPort] = (),
) -> None:
    """Replace vmhive's ruleset with the one for `networks`, `forwards` and `ports`.

    Pass everything vmhive has on this host: whatever is left out loses its rules.
    """
    nets = list(networks)
    apply_ruleset(render_ruleset(nets, forwards, ports))
    # Only now that the input guard is loaded may localhost packets be routed to VMs.
    for net in nets:
        if net.type == NetworkType.NAT and links.get_link(net.bridge) is not None:
            links.set_route_localnet(net.bridge, True)


def remove_firewall() -> None:
    """Delete vmhive's tables (idempotent)."""
    apply_ruleset(render_ruleset(()))


def firewall_tables() -> list[str]:
    """vmhive's tables present on the host, as ``"<family> vmhive"``."""
    try:
        result = subprocess.run(
            [_nft_binary(), "list", "tables"],
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"cannot run nft: {exc}") from None
    if result.returncode != 0:
        raise FirewallError(f"nft cannot list tables: {result.stderr.strip()}")
    tables = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "table" and fields[2] == TABLE:
            tables.append(f"{fields[1]} {TABLE}")
    return tables
