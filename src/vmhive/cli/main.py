"""`vmhive`: a thin command-line client of the REST API (plus `serve` itself)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

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
    err,
    human_size,
    out,
    print_json,
    run_job,
    state,
)
from vmhive.cli.network import host_cleanup, network_app, nic_app
from vmhive.cli.nodes import node_app, print_placement
from vmhive.cli.snapshots import snapshot_app
from vmhive.cli.storage import cdrom_app, disk_app, iso_app, pool_app, volume_app
from vmhive.cli.users import user_app
from vmhive.config import DEFAULT_LISTEN, Settings, default_data_dir
from vmhive.storage.qemu_img import parse_size

app = typer.Typer(help="vmhive: manage QEMU/KVM virtual machines.", no_args_is_help=True)
vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
image_app = typer.Typer(help="Base images.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs: every change runs as one.", no_args_is_help=True)
host_app = typer.Typer(help="This host.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(image_app, name="image")
app.add_typer(job_app, name="job")
app.add_typer(host_app, name="host")
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(iso_app, name="iso")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(user_app, name="user")
app.add_typer(node_app, name="node")
vm_app.add_typer(disk_app, name="disk")
vm_app.add_typer(cdrom_app, name="cdrom")
vm_app.add_typer(cloudinit_app, name="cloud-init")
vm_app.add_typer(nic_app, name="nic")
app.add_typer(network_app, name="network")
host_app.command("cleanup")(host_cleanup)


@app.callback()
def main_options(
    api: Annotated[
        str | None,
        typer.Option(help="API URL (default: the data dir's unix socket); env VMHIVE_API"),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="bearer token for --api; env VMHIVE_TOKEN")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data dir; env VMHIVE_DATA_DIR")] = None,
) -> None:
    state.api, state.token, state.data_dir = api, token, data_dir


# -- serve, token, host -------------------------------------------------------------


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@app.command()
def serve(
    data_dir: Annotated[
        Path | None, typer.Option(help="where state lives; env VMHIVE_DATA_DIR")
    ] = None,
    listen: Annotated[str, typer.Option(help="TCP address of the API")] = DEFAULT_LISTEN,
    db: Annotated[
        str | None, typer.Option(help="database URL (default: SQLite in the data dir)")
    ] = None,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg")] = "auto",
    image_dir: Annotated[
        Path | None, typer.Option(help="image store (default: <data-dir>/images)")
    ] = None,
    demo: Annotated[bool, typer.Option(help="create the demo VM on first start")] = True,
    default_network: Annotated[
        bool, typer.Option(help="create the nat network 'default' on first start")
    ] = True,
    stop_timeout: Annotated[
        float, typer.Option(help="seconds of ACPI grace before a stop forces off")
    ] = 60.0,
    node_name: Annotated[
        str | None, typer.Option(help="this node's name in a cluster (default: the host name)")
    ] = None,
    node_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT where other nodes reach this API (default: --listen)"),
    ] = None,
) -> None:
    """Run the daemon in the foreground: API, agent and job runner."""
    import asyncio
    import logging

    from vmhive.daemon import serve as serve_daemon

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("qemu").setLevel(logging.CRITICAL)
    settings = Settings(
        data_dir=(data_dir or state.data_dir or default_data_dir()).resolve(),
        db_url=db,
        listen=listen,
        accel=accel,
        image_dir=image_dir.resolve() if image_dir else None,
        create_demo=demo,
        default_network=default_network,
        stop_timeout=stop_timeout,
        node_name=node_name,
        node_address=node_address,
    )
    try:
        settings.check()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    asyncio.run(serve_daemon(settings))


@app.command()
def token() -> None:
    """Print the API token (for --api / VMHIVE_TOKEN over TCP)."""
    path = (state.data_dir or default_data_dir()) / "token"
    try:
        print(path.read_text().strip())
    except OSError as exc:
        raise CliError(
            f"cannot read {path}: {exc.strerror} (has `vmhive serve` run yet?)"
        ) from None


@host_app.command("info")
def host_info(output: OutputOpt = Output.table) -> None:
    """Host facts: QEMU, accelerator (with the KVM probe's verdict), machine types."""
    info = api().get("/host")
    if output == Output.json:
        print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key in (
        "hostname",
        "kernel",
        "cpus",
        "memory_mib",
        "qemu_version",
        "accel",
        "accel_reason",
        "data_dir",
        "image_dir",
    ):
        table.add_row(key, str(info.get(key)))
    table.add_row("machine types", ", ".join(f"{k}={v}" for k, v in info["machine_types"].items()))
    table.add_row("vms", ", ".join(f"{k}={v}" for k, v in info["vms"].items()) or "none")
    for proc in info["unowned_qemu_processes"]:
        table.add_row("unowned QEMU", f"PID {proc['pid']}")
    out.print(table)
    if not info["kvm_usable"]:
        err.print(
            f"[yellow]warning:[/] KVM is not usable here ({info['accel_reason']}); "
            "VMs run under TCG, 5-10x slower"
        )


# -- VMs ------------------------------------------------------------------------------


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
        bool, typer.Option(help="copy the image instead of a copy-on-write overlay")
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
        disks.append(
            {"image": image, "size": disk_size, "mode": "copy" if full_copy else "overlay"}
        )
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


@image_app.command("list")
def image_list(output: OutputOpt = Output.table) -> None:
    """List base images."""
    images = api().get("/images")
    if output == Output.json:
        print_json(images)
        return
    table = Table("name", "origin", "format", "virtual size", "on disk", "sha256")
    for i in images:
        table.add_row(
            i["name"],
            i["origin"],
            i["format"],
            human_size(i["virtual_size"]),
            human_size(i["actual_size"]),
            i["sha256"][:16],
        )
    out.print(table)


@image_app.command("show")
def image_show(name: str, output: OutputOpt = Output.table) -> None:
    """An image: checksum, sizes, origin and the VMs made from it."""
    image = api().get(f"/images/{name}")
    if output == Output.json:
        print_json(image)
        return
    used = image["used_by"] or {}
    for key in ("name", "origin", "source", "format", "path", "sha256", "created_at"):
        out.print(f"{key + ':':<14}{image[key]}")
    out.print(f"{'virtual size:':<14}{human_size(image['virtual_size'])}")
    out.print(f"{'on disk:':<14}{human_size(image['actual_size'])}")
    out.print(f"{'overlays:':<14}{', '.join(used.get('overlay', [])) or '-'}")
    out.print(f"{'copies:':<14}{', '.join(used.get('copy', [])) or '-'}")


@image_app.command("delete")
def image_delete(name: str) -> None:
    """Delete an image (refused while VM disks are overlays on it)."""
    api().delete(f"/images/{name}")
    out.print(f"image {name} deleted")


@image_app.command("build")
def image_build(
    recipe: Annotated[str, typer.Argument(help="tiny (busybox test guest) or debian (Debian 12)")],
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Build an image from its recipe (cached: a current image is not rebuilt)."""
    client = api()
    job = run_job(client, client.post(f"/images/build/{recipe}"), output, wait)
    if wait and output == Output.table:
        out.print(f"image {recipe} ready: {job['result']['path']}")


@image_app.command("import")
def image_import(
    source: Annotated[
        str, typer.Argument(help="image file on the daemon's host, or an http(s) URL")
    ],
    name: Annotated[str | None, typer.Option(help="image name (default: from SOURCE)")] = None,
    format: Annotated[str, typer.Option(help="auto, qcow2, raw, vmdk, vhdx, vdi or vpc")] = "auto",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Add a disk image to the store, after a safety check, as qcow2."""
    client = api()
    body = {"source": source, "name": name, "format": format}
    job = run_job(client, client.post("/images", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"image {job['result']['image']} imported (sha256 {job['result']['sha256']})")


@job_app.command("list")
def job_list(output: OutputOpt = Output.table, limit: int = 20) -> None:
    """Recent jobs."""
    jobs = api().get("/jobs", params={"limit": limit})
    if output == Output.json:
        print_json(jobs)
        return
    # The id is what `job show/wait/cancel` take: never shorten it.
    table = Table(
        Column("id", no_wrap=True, min_width=36),
        "kind",
        "target",
        "state",
        "progress",
        "created",
        "error",
    )
    for j in jobs:
        table.add_row(
            j["id"],
            j["kind"],
            str(j["params"].get("name", j["target"])),
            j["state"],
            f"{j['progress']}%",
            j["created_at"][:19],
            j["error"] or "",
        )
    out.print(table)


def _print_job(job: dict[str, Any], output: Output) -> None:
    if output == Output.json:
        print_json(job)
        return
    out.print(f"job {job['id']}  {job['kind']}  {job['state']}  {job['progress']}%")
    if job["error"]:
        out.print(f"error: {job['error']}")
    for line in job["log"]:
        out.print(f"  {line['seq']:>3} {line['at'][11:19]} {line['message']}")


@job_app.command("show")
def job_show(job_id: str, output: OutputOpt = Output.table) -> None:
    """One job with its log."""
    _print_job(api().get(f"/jobs/{job_id}"), output)


@job_app.command("wait")
def job_wait(job_id: str, output: OutputOpt = Output.table) -> None:
    """Wait for a job to end; exits non-zero if it did not succeed."""
    client = api()
    run_job(client, client.get(f"/jobs/{job_id}"), output)
    if output == Output.table:
        _print_job(client.get(f"/jobs/{job_id}"), output)


@job_app.command("cancel")
def job_cancel(job_id: str, output: OutputOpt = Output.table) -> None:
    """Cancel a queued job (or a running one that allows it)."""
    _print_job(api().post(f"/jobs/{job_id}/cancel"), output)


def main() -> None:
    try:
        app(standalone_mode=False)
    except CliError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
