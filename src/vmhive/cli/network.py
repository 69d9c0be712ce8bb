"""`vmhive network ...`, `vmhive vm nic ...` and `vmhive host cleanup`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vmhive.cli.common import Output, OutputOpt, WaitOpt, api, out, print_json, run_job

network_app = typer.Typer(help="Virtual switches (networks).", no_args_is_help=True)
forward_app = typer.Typer(help="Port forwards on nat networks.", no_args_is_help=True)
nic_app = typer.Typer(help="A VM's network interfaces.", no_args_is_help=True)
network_app.add_typer(forward_app, name="forward")


@network_app.command("create")
def network_create(
    name: str,
    type: Annotated[
        str, typer.Option("--type", "-t", help="nat, internal, private or external")
    ] = "nat",
    subnet: Annotated[
        str | None, typer.Option(help="e.g. 10.10.0.0/24 (default: a free /24)")
    ] = None,
    gateway: Annotated[str | None, typer.Option(help="default: the subnet's first address")] = None,
    dhcp_start: Annotated[str | None, typer.Option(help="first DHCP address")] = None,
    dhcp_end: Annotated[str | None, typer.Option(help="last DHCP address")] = None,
    uplink: Annotated[str | None, typer.Option(help="external: host NIC to bridge onto")] = None,
    bridge: Annotated[str | None, typer.Option(help="external: an existing host bridge")] = None,
    domain: Annotated[str | None, typer.Option(help="DNS domain of the VMs")] = None,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Create a network: its bridge, DHCP/DNS server and firewall rules."""
    body = {
        "name": name,
        "type": type,
        "subnet": subnet,
        "gateway": gateway,
        "dhcp_start": dhcp_start,
        "dhcp_end": dhcp_end,
        "uplink": uplink,
        "bridge": bridge,
        "domain": domain,
    }
    client = api()
    job = run_job(client, client.post("/networks", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"network {name} ready on bridge {job['result']['bridge']}")


@network_app.command("list")
def network_list(output: OutputOpt = Output.table) -> None:
    """List networks."""
    networks = api().get("/networks")
    if output == Output.json:
        print_json(networks)
        return
    table = Table("name", "type", "bridge", "subnet", "gateway", "NICs")
    for n in networks:
        table.add_row(
            n["name"],
            n["type"],
            n["bridge"],
            n["subnet"] or "-",
            n["gateway"] or "-",
            str(n["nics"]),
        )
    out.print(table)


@network_app.command("show")
def network_show(name: str, output: OutputOpt = Output.table) -> None:
    """A network, the VM NICs on it with their addresses, and its forwards."""
    net = api().get(f"/networks/{name}")
    if output == Output.json:
        print_json(net)
        return
    for key in ("name", "type", "bridge", "subnet", "gateway", "dhcp_range", "uplink", "domain"):
        value = net[key]
        if isinstance(value, list):
            value = " - ".join(value)
        out.print(f"{key + ':':<12}{value if value is not None else '-'}")
    table = Table("VM", "NIC", "MAC", "IPv4")
    for port in net["ports"]:
        table.add_row(port["vm"], str(port["nic"]), port["mac"], port["ip"] or "-")
    out.print(table)


@network_app.command("delete")
def network_delete(name: str, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
    """Delete a network (refused while VM NICs use it)."""
    client = api()
    run_job(client, client.delete(f"/networks/{name}"), output, wait)
    if wait and output == Output.table:
        out.print(f"network {name} deleted")


@forward_app.command("add")
def forward_add(
    network: str,
    host_port: Annotated[int, typer.Option(help="port on the host")],
    vm: Annotated[str, typer.Option(help="the VM to forward to")],
    vm_port: Annotated[int, typer.Option(help="port in the VM")],
    proto: Annotated[str, typer.Option(help="tcp or udp")] = "tcp",
    nic: Annotated[
        int | None, typer.Option(help="the VM's NIC (default: its first on NETWORK)")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Forward a host port to a VM (also from the host itself, 127.0.0.1 included)."""
    body = {"host_port": host_port, "vm": vm, "vm_port": vm_port, "proto": proto, "nic": nic}
    result = api().post(f"/networks/{network}/forwards", json=body)
    if output == Output.json:
        print_json(result)
        return
    out.print(f"{proto}/{host_port} -> {vm}:{vm_port}")


@forward_app.command("list")
def forward_list(network: str, output: OutputOpt = Output.table) -> None:
    """Port forwards of a network."""
    forwards = api().get(f"/networks/{network}/forwards")
    if output == Output.json:
        print_json(forwards)
        return
    table = Table("proto", "host port", "VM", "NIC", "VM address", "VM port")
    for f in forwards:
        table.add_row(
            f["proto"], str(f["host_port"]), f["vm"], str(f["nic"]),
            f["vm_ip"] or "(waiting for DHCP)", str(f["vm_port"]),
        )  # fmt: skip
    out.print(table)


@forward_app.command("remove")
def forward_remove(
    network: str,
    host_port: Annotated[int, typer.Option(help="port on the host")],
    proto: Annotated[str, typer.Option(help="tcp or udp")] = "tcp",
) -> None:
    """Remove a port forward."""
    api().delete(f"/networks/{network}/forwards/{proto}/{host_port}")
    out.print(f"{proto}/{host_port} removed")


@nic_app.command("add")
def nic_add(
    vm: str,
    network: Annotated[str, typer.Option(help="the network to connect to")],
    mac: Annotated[str | None, typer.Option(help="52:54:00:xx:xx:xx (default: random)")] = None,
    model: Annotated[str | None, typer.Option(help="virtio or e1000")] = None,
    ip: Annotated[str | None, typer.Option(help="a fixed address (DHCP reservation)")] = None,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Add a NIC (hot-plugged if a generation 2 VM runs)."""
    client = api()
    body = {"network": network, "mac": mac, "model": model, "ip": ip}
    job = run_job(client, client.post(f"/vms/{vm}/nics", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"NIC {job['result']['nic']} ({job['result']['mac']}) of {vm} on {network}")


@nic_app.command("remove")
def nic_remove(vm: str, index: int, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
    """Remove NIC INDEX (unplugged if a generation 2 VM runs)."""
    client = api()
    run_job(client, client.delete(f"/vms/{vm}/nics/{index}"), output, wait)
    if wait and output == Output.table:
        out.print(f"NIC {index} of {vm} removed")


@nic_app.command("list")
def nic_list(vm: str, output: OutputOpt = Output.table) -> None:
    """A VM's NICs with their networks and addresses."""
    nics = api().get(f"/vms/{vm}")["nics"]
    if output == Output.json:
        print_json(nics)
        return
    table = Table("NIC", "network", "MAC", "model", "IPv4", "link")
    for n in nics:
        table.add_row(
            str(n["index"]), n["network"] or "(user-mode NAT)", n["mac"], n["model"] or "-",
            n["ip"] or "-", "up" if n["link_up"] else "down",
        )  # fmt: skip
    out.print(table)


@nic_app.command("link")
def nic_link(
    vm: str,
    index: int,
    state: Annotated[str, typer.Argument(help="up or down")],
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Plug or unplug the virtual cable of a NIC."""
    if state not in ("up", "down"):
        raise typer.BadParameter("STATE must be up or down")
    client = api()
    body = {"up": state == "up"}
    run_job(client, client.post(f"/vms/{vm}/nics/{index}/link", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"NIC {index} of {vm}: link {state}")


def host_cleanup(
    dry_run: Annotated[bool, typer.Option(help="only list what would be removed")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Remove vmhive-named bridges, TAPs, nftables tables and dnsmasq that nothing owns."""
    stray = api().post("/host/cleanup", params={"dry_run": dry_run})
    if output == Output.json:
        print_json(stray)
        return
    found = [(kind, item) for kind, items in stray.items() for item in items]
    for kind, item in found:
        out.print(f"{'would remove' if dry_run else 'removed'} {kind}: {item}")
    if not found:
        out.print("nothing to clean up")
