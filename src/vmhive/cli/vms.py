"""`vmhive vm ...`: create, list, show, power, delete, template, clone, edit, console."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from vmhive.cli.client import CliError
from vmhive.cli.cloudinit import (
    HostnameOpt,
    IpconfigOpt,
    KeyOpt,
    NameserverOpt,
    NetworkConfigOpt,
    PasswordOpt,
    UserOpt,
    apply_flags,
    cloudinit_app,
    read_text,
)
from vmhive.cli.common import (
    Output,
    OutputOpt,
    WaitOpt,
    api,
    human_size,
    out,
    print_json,
    run_job,
)
from vmhive.cli.network import nic_app
from vmhive.cli.nodes import print_placement
from vmhive.cli.storage import cdrom_app, disk_app
from vmhive.storage.qemu_img import parse_size

vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
vm_app.add_typer(disk_app, name="disk")
vm_app.add_typer(cdrom_app, name="cdrom")
vm_app.add_typer(cloudinit_app, name="cloud-init")
vm_app.add_typer(nic_app, name="nic")


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@vm_app.command("create")
def vm_create(
    name: str,
    generation: Annotated[
        int,
        typer.Option("--generation", "-g", help="1 = BIOS + emulated devices, 2 = UEFI + virtio"),
    ] = 2,
    vcpus: Annotated[int, typer.Option(help="virtual CPUs")] = 1,
    memory: Annotated[int, typer.Option(help="memory in MiB")] = 512,
    image: Annotated[str | None, typer.Option(help="create the disk from this image")] = None,
    disk_size: Annotated[
        str | None, typer.Option(help="size of a blank disk (or to grow the image to), e.g. 10G")
    ] = None,
    full_copy: Annotated[
        bool,
        typer.Option(
            help="copy the image instead of a copy-on-write overlay (always in a shared pool)"
        ),
    ] = False,
    iso: Annotated[
        str | None, typer.Option(help="installer ISO for the CD-ROM (library name or path)")
    ] = None,
    cdrom: Annotated[bool, typer.Option(help="add an empty CD-ROM drive")] = False,
    cloud_init: Annotated[
        bool, typer.Option(help="attach a cloud-init NoCloud seed (hostname = VM name)")
    ] = False,
    user_data: Annotated[
        Path | None, typer.Option(help="cloud-init user-data file (implies --cloud-init)")
    ] = None,
    hostname: HostnameOpt = None,
    user: UserOpt = None,
    ssh_key: KeyOpt = None,
    password_hash: PasswordOpt = None,
    network_config: NetworkConfigOpt = None,
    ipconfig: IpconfigOpt = None,
    nameserver: NameserverOpt = None,
    boot_order: Annotated[str | None, typer.Option(help="e.g. cdrom,disk,network")] = None,
    kernel: Annotated[str | None, typer.Option(help="direct kernel boot: kernel path")] = None,
    initrd: Annotated[str | None, typer.Option(help="direct kernel boot: initrd path")] = None,
    cmdline: Annotated[str | None, typer.Option(help="direct kernel boot: command line")] = None,
    nic: Annotated[bool, typer.Option(help="add a NIC")] = True,
    network: Annotated[
        str | None,
        typer.Option(
            help="network of the NIC (default: 'default' if it exists, else user-mode NAT)"
        ),
    ] = None,
    nic_model: Annotated[str | None, typer.Option(help="virtio or e1000")] = None,
    ip: Annotated[
        str | None, typer.Option(help="fixed address of the NIC (DHCP reservation)")
    ] = None,
    mac: Annotated[str | None, typer.Option(help="MAC address of the NIC")] = None,
    autostart: Annotated[bool, typer.Option(help="start when the daemon starts")] = False,
    description: Annotated[str, typer.Option(help="free text")] = "",
    start: Annotated[bool, typer.Option(help="start it once created")] = False,
    node: Annotated[
        str | None, typer.Option(help="the node to create it on (default: placement)")
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="anti-affinity group: its VMs go to different nodes")
    ] = None,
    placement: Annotated[str, typer.Option(help="spread or pack")] = "spread",
    pool: Annotated[
        str | None,
        typer.Option(help="storage pool for its disks (a shared one lets it move with its disks)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="explain where it would go; create nothing")
    ] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Create a VM. Any cloud-init flag attaches a NoCloud seed."""
    if dry_run:
        demand = {
            "vcpus": vcpus,
            "memory_mib": memory,
            "storage_bytes": size_arg(disk_size) if disk_size else 0,
            "affinity_group": group,
            "networks": [network] if network else [],
            "pools": [pool] if pool else [],
            "strategy": placement,
        }
        print_placement(api().post("/placement", json=demand), output)
        return
    cloud_settings = apply_flags(
        {},
        hostname=hostname,
        user=user,
        ssh_key=ssh_key,
        password_hash=password_hash,
        network_config=network_config,
        ipconfig=ipconfig,
        nameserver=nameserver,
    )
    disks: list[dict[str, Any]] = []
    if image:
        disks.append({"image": image, "size": disk_size, "mode": "copy" if full_copy else None})
    elif disk_size:
        disks.append({"size": disk_size})
    body = {
        "name": name,
        "generation": generation,
        "vcpus": vcpus,
        "memory_mib": memory,
        "disks": disks,
        "iso": iso,
        "cdrom": cdrom,
        "cloud_init": cloud_init,
        "user_data": read_text(user_data) if user_data else None,
        "cloud_init_settings": cloud_settings or None,
        "boot_order": boot_order,
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": cmdline,
        "nic": nic,
        "network": network,
        "nic_model": nic_model,
        "ip": ip,
        "mac": mac,
        "autostart": autostart,
        "description": description,
        "start": start,
        "node": node,
        "affinity_group": group,
        "placement": placement,
        "pool": pool,
    }
    client = api()
    run_job(client, client.post("/vms", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"VM {name} created" + (" and started" if start else ""))


VM_COLUMNS = ("name", "state", "generation", "vcpus", "memory_mib", "ip", "pid", "accel")


@vm_app.command("list")
def vm_list(output: OutputOpt = Output.table) -> None:
    """List VMs."""
    vms = api().get("/vms")
    if output == Output.json:
        print_json(vms)
        return
    table = Table(
        *("gen" if c == "generation" else "memory" if c == "memory_mib" else c for c in VM_COLUMNS)
    )
    for vm in vms:
        row = {
            **vm,
            "memory_mib": f"{vm['memory_mib']} MiB",
            "pid": vm["pid"] or "-",
            "accel": vm["accel"] or "-",
            "ip": ", ".join(n["ip"] for n in vm["nics"] if n.get("ip")) or "-",
        }
        table.add_row(*(str(row[c]) for c in VM_COLUMNS))
    out.print(table)


@vm_app.command("show")
def vm_show(name: str, output: OutputOpt = Output.table) -> None:
    """Show one VM."""
    vm = api().get(f"/vms/{name}")
    if output == Output.json:
        print_json(vm)
        return
    table = Table(show_header=False, box=None)
    for key in (
        "name",
        "uuid",
        "state",
        "state_reason",
        "desired_state",
        "generation",
        "machine",
        "vcpus",
        "memory_mib",
        "accel",
        "pid",
        "boot_order",
        "autostart",
        "description",
    ):
        table.add_row(key, str(vm[key]))
    for disk in vm["disks"]:
        table.add_row(
            f"disk{disk['index']}",
            f"{disk['path']} ({human_size(disk['size_bytes'])}, {disk['source']})",
        )
    for cd in vm["cdroms"]:
        table.add_row(f"cdrom{cd['index']}", cd["iso"] or "(empty)")
    for nic in vm["nics"]:
        where = f"network {nic['network']}" if nic["network"] else "user-mode NAT"
        address = nic["ip"] or (f"reserved {nic['reserved_ip']}" if nic["reserved_ip"] else "")
        link = "" if nic["link_up"] else ", link down"
        table.add_row(f"nic{nic['index']}", f"{nic['mac']} ({where}{link}) {address}".rstrip())
    if vm["cloud_init"]:
        table.add_row("cloud-init", f"instance-id {vm['cloud_init_instance_id']}")
    if vm["is_template"]:
        table.add_row("template", "yes (clone it to run it)")
    if vm["kernel"]:
        table.add_row("kernel", f"{vm['kernel']} initrd={vm['initrd']} cmdline={vm['cmdline']!r}")
    out.print(table)


def _power(
    name: str, action: str, output: Output, wait: bool, params: dict[str, Any] | None = None
) -> None:
    client = api()
    job = client.post(f"/vms/{name}/{action}", params=params or {})
    run_job(client, job, output, wait)
    if wait and output == Output.table:
        vm = client.get(f"/vms/{name}")
        out.print(f"{name}: {vm['state']}")


@vm_app.command("stop")
def vm_stop(
    name: str,
    timeout: Annotated[float | None, typer.Option(help="seconds before forcing off")] = None,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Shut a VM down gracefully (ACPI), forcing it off after the timeout."""
    _power(name, "stop", output, wait, {"timeout": timeout} if timeout is not None else None)


SIMPLE_POWER_ACTIONS = {
    "start": "Start a VM.",
    "force-stop": "Turn a VM off at once.",
    "reboot": "Power-cycle a VM cleanly (ACPI off, then start).",
    "reset": "Hard-reset a VM.",
    "pause": "Pause a VM's vCPUs.",
    "resume": "Resume a paused VM.",
}


def _register_power_action(action: str, help_text: str) -> None:
    def command(name: str, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
        _power(name, action, output, wait)

    command.__doc__ = help_text
    vm_app.command(action)(command)


for _action, _help in SIMPLE_POWER_ACTIONS.items():
    _register_power_action(_action, _help)


@vm_app.command("delete")
def vm_delete(
    name: str,
    force: Annotated[bool, typer.Option(help="force a running VM off first")] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Delete a VM with its disks and files."""
    client = api()
    run_job(client, client.request("DELETE", f"/vms/{name}", params={"force": force}), output, wait)
    if wait and output == Output.table:
        out.print(f"VM {name} deleted")


@vm_app.command("template")
def vm_template(name: str, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
    """Turn a stopped VM into a template (read-only; clone it to run it)."""
    client = api()
    run_job(client, client.post(f"/vms/{name}/template"), output, wait)
    if wait and output == Output.table:
        out.print(f"{name} is now a template")


@vm_app.command("migrate")
def vm_migrate(
    name: str,
    to: Annotated[str, typer.Option("--to", help="the node to move it to")],
    downtime: Annotated[int, typer.Option(help="longest pause at the switchover, in ms")] = 100,
    bandwidth: Annotated[
        str | None, typer.Option(help="cap for RAM and disk copy per second, e.g. 100M")
    ] = None,
    auto_converge: Annotated[
        bool, typer.Option(help="slow a guest that dirties memory too fast")
    ] = True,
    multifd: Annotated[int, typer.Option(help="parallel RAM streams (0: one)")] = 0,
    postcopy: Annotated[
        bool, typer.Option(help="switch to post-copy if pre-copy does not converge")
    ] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="move a stopped VM whose disks every node sees")
    ] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Live-migrate a running VM to another node (disks too, unless shared)."""
    body = {
        "to": to,
        "downtime_limit_ms": downtime,
        "bandwidth": size_arg(bandwidth) if bandwidth else None,
        "auto_converge": auto_converge,
        "multifd_channels": multifd,
        "postcopy": postcopy,
        "offline": offline,
    }
    client = api()
    job = run_job(
        client, client.post(f"/vms/{quote(name, safe='')}/migrate", json=body), output, wait
    )
    if wait and output == Output.table:
        out.print(f"VM {name} runs on node {job.get('result', {}).get('node', to)}")


@vm_app.command("clone")
def vm_clone(
    source: str,
    name: str,
    linked: Annotated[
        bool | None,
        typer.Option("--linked/--full", help="overlay on the template, or a full copy"),
    ] = None,
    start: Annotated[bool, typer.Option(help="start the clone")] = False,
    snapshot: Annotated[
        str | None, typer.Option(help="a full copy of SOURCE as this snapshot of it holds it")
    ] = None,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Clone a template (linked by default) or a stopped VM (full)."""
    client = api()
    body = {"name": name, "linked": linked, "start": start, "snapshot": snapshot}
    job = run_job(client, client.post(f"/vms/{source}/clone", json=body), output, wait)
    if wait and output == Output.table:
        kind = "linked" if job["result"]["linked"] else "full"
        out.print(f"{name} is a {kind} clone of {source}" + (" and runs" if start else ""))


@vm_app.command("edit")
def vm_edit(
    name: str,
    vcpus: Annotated[int | None, typer.Option(help="virtual CPUs (while stopped)")] = None,
    memory: Annotated[int | None, typer.Option(help="memory in MiB (while stopped)")] = None,
    description: Annotated[str | None, typer.Option(help="free text")] = None,
    boot_order: Annotated[str | None, typer.Option(help="e.g. disk,cdrom (while stopped)")] = None,
    autostart: Annotated[
        bool | None, typer.Option("--autostart/--no-autostart", help="start with the daemon")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change a VM's settings."""
    body = {
        "vcpus": vcpus,
        "memory_mib": memory,
        "description": description,
        "boot_order": boot_order,
        "autostart": autostart,
    }
    vm = api().request(
        "PATCH", f"/vms/{name}", json={k: v for k, v in body.items() if v is not None}
    )
    if output == Output.json:
        print_json(vm)
    else:
        out.print(f"VM {name} updated")


@vm_app.command("console")
def vm_console(
    name: str,
    log: Annotated[
        bool, typer.Option("--log", help="print the captured console output and exit")
    ] = False,
) -> None:
    """Attach to a VM's serial console (Ctrl-] detaches)."""
    client = api()
    if log:
        sys.stdout.buffer.write(client.get(f"/vms/{name}/console/log"))
        sys.stdout.flush()
        return
    from vmhive.cli.console import attach

    client.get(f"/vms/{name}")  # a clear error for an unknown VM
    attach(client.target, name)


# -- images and jobs -----------------------------------------------------------------
