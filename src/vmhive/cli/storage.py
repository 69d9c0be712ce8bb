"""`vmhive pool ...`, `vmhive volume ...` and `vmhive vm disk ...`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from vmhive.cli.common import Output, OutputOpt, WaitOpt, api, human_size, out, print_json, run_job

pool_app = typer.Typer(help="Storage pools.", no_args_is_help=True)
volume_app = typer.Typer(help="Volumes in storage pools.", no_args_is_help=True)
disk_app = typer.Typer(help="A VM's disks from pool volumes.", no_args_is_help=True)
iso_app = typer.Typer(help="The ISO library.", no_args_is_help=True)
cdrom_app = typer.Typer(help="A VM's CD-ROM drives.", no_args_is_help=True)

PoolOpt = Annotated[str, typer.Option("--pool", "-p", help="storage pool")]


def _pool_rows(pools: list[dict[str, Any]]) -> Table:
    table = Table("name", "type", "shared", "path", "volumes", "free", "total", "here")
    for p in pools:
        table.add_row(
            p["name"], p["type"], "yes" if p["shared"] else "no", p["path"], str(p["volumes"]),
            human_size(p["free_bytes"]), human_size(p["total_bytes"]),
            "usable" if p["usable"] else p["problem"],
        )  # fmt: skip
    return table


@pool_app.command("create")
def pool_create(
    name: str,
    path: Annotated[str, typer.Option(help="its directory (the same path on every node)")],
    shared: Annotated[
        bool,
        typer.Option(
            "--shared/--local",
            help="shared: one storage mounted at PATH on every node; local: a directory "
            "on each node (made if missing)",
        ),
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Define a storage pool for the whole cluster."""
    pool = api().post("/pools", json={"name": name, "path": path, "shared": shared})
    print_json(pool) if output == Output.json else out.print(_pool_rows([pool]))


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Forget a pool that holds no volume and no VM disk (its directory stays)."""
    api().delete(f"/pools/{name}")
    out.print(f"pool {name} deleted")


@pool_app.command("list")
def pool_list(output: OutputOpt = Output.table) -> None:
    """List storage pools."""
    pools = api().get("/pools")
    print_json(pools) if output == Output.json else out.print(_pool_rows(pools))


@pool_app.command("show")
def pool_show(name: str, output: OutputOpt = Output.table) -> None:
    """Show one storage pool."""
    pool = api().get(f"/pools/{name}")
    print_json(pool) if output == Output.json else out.print(_pool_rows([pool]))


def _volume_table(volumes: list[dict[str, Any]]) -> Table:
    table = Table("pool", "name", "format", "size", "allocated", "attached to", "node", "path")
    for v in volumes:
        table.add_row(
            v["pool"], v["name"], v["format"], human_size(v["virtual_size"]),
            human_size(v["allocated_size"]), ", ".join(v["attached_to"]) or "-",
            v.get("node") or "-", v["path"],
        )  # fmt: skip
    return table


@volume_app.command("create")
def volume_create(
    name: str,
    size: Annotated[str, typer.Option(help="e.g. 10G")],
    pool: PoolOpt = "local",
    format: Annotated[str, typer.Option(help="qcow2 or raw")] = "qcow2",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Create a blank volume."""
    client = api()
    body = {"name": name, "size": size, "format": format}
    run_job(client, client.post(f"/pools/{pool}/volumes", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"volume {pool}/{name} created")


@volume_app.command("list")
def volume_list(
    pool: Annotated[str | None, typer.Option("--pool", "-p", help="only this pool")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List volumes with their virtual and allocated sizes."""
    volumes = api().get("/volumes", params={"pool": pool} if pool else {})
    print_json(volumes) if output == Output.json else out.print(_volume_table(volumes))


@volume_app.command("show")
def volume_show(name: str, pool: PoolOpt = "local", output: OutputOpt = Output.table) -> None:
    """Show one volume."""
    volume = api().get(f"/pools/{pool}/volumes/{name}")
    print_json(volume) if output == Output.json else out.print(_volume_table([volume]))


@volume_app.command("resize")
def volume_resize(
    name: str,
    size: Annotated[str, typer.Option(help="the new size, e.g. 20G (grow only)")],
    pool: PoolOpt = "local",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Grow a volume (online when a running VM uses it)."""
    client = api()
    job = client.post(f"/pools/{pool}/volumes/{name}/resize", json={"size": size})
    run_job(client, job, output, wait)
    if wait and output == Output.table:
        out.print(f"volume {pool}/{name} is now {size}")


@volume_app.command("delete")
def volume_delete(
    name: str, pool: PoolOpt = "local", wait: WaitOpt = True, output: OutputOpt = Output.table
) -> None:
    """Delete a volume (refused while attached or used as a backing file)."""
    client = api()
    run_job(client, client.request("DELETE", f"/pools/{pool}/volumes/{name}"), output, wait)
    if wait and output == Output.table:
        out.print(f"volume {pool}/{name} deleted")


@volume_app.command("import")
def volume_import(
    source: Annotated[
        str, typer.Argument(help="image file on the daemon's host, or an http(s) URL")
    ],
    name: Annotated[
        str | None, typer.Option(help="name of the new volume (default: from SOURCE)")
    ] = None,
    pool: PoolOpt = "local",
    format: Annotated[str, typer.Option(help="auto, qcow2, raw, vmdk, vhdx, vdi or vpc")] = "auto",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Convert a disk image from another hypervisor into a qcow2 volume, after a safety check."""
    client = api()
    body = {"name": name, "source": source, "format": format}
    job = run_job(client, client.post(f"/pools/{pool}/import", json=body), output, wait)
    if wait and output == Output.table:
        out.print(f"imported {source} as {pool}/{job['result']['volume']}")


@disk_app.command("attach")
def disk_attach(
    vm: str,
    volume: str,
    pool: PoolOpt = "local",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Attach a volume to a stopped VM as its next disk."""
    client = api()
    job = client.post(f"/vms/{vm}/disks", json={"pool": pool, "volume": volume})
    run_job(client, job, output, wait)
    if wait and output == Output.table:
        out.print(f"{pool}/{volume} attached to {vm}")


@disk_app.command("detach")
def disk_detach(
    vm: str,
    volume: str,
    pool: PoolOpt = "local",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Detach a volume from a stopped VM (the volume is kept)."""
    client = api()
    run_job(client, client.request("DELETE", f"/vms/{vm}/disks/{pool}/{volume}"), output, wait)
    if wait and output == Output.table:
        out.print(f"{pool}/{volume} detached from {vm}")


@iso_app.command("import")
def iso_import(
    source: Annotated[str, typer.Argument(help="ISO file on the daemon's host, or an http(s) URL")],
    name: Annotated[str | None, typer.Option(help="name in the library")] = None,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Copy (or download) an ISO into the library."""
    client = api()
    job = run_job(client, client.post("/isos", json={"source": source, "name": name}), output, wait)
    if wait and output == Output.table:
        out.print(f"ISO {job['result']['iso']} imported")


@iso_app.command("list")
def iso_list(output: OutputOpt = Output.table) -> None:
    """List the ISO library."""
    isos = api().get("/isos")
    if output == Output.json:
        print_json(isos)
        return
    table = Table("name", "size", "used by", "path")
    for i in isos:
        table.add_row(i["name"], human_size(i["size"]), ", ".join(i["used_by"]) or "-", i["path"])
    out.print(table)


@iso_app.command("delete")
def iso_delete(name: str) -> None:
    """Delete an ISO from the library (refused while in a CD-ROM drive)."""
    api().request("DELETE", f"/isos/{name}")
    out.print(f"ISO {name} deleted")


DriveOpt = Annotated[int, typer.Option("--drive", help="CD-ROM drive number")]


@cdrom_app.command("insert")
def cdrom_insert(
    vm: str, iso: str, drive: DriveOpt = 0, wait: WaitOpt = True, output: OutputOpt = Output.table
) -> None:
    """Put an ISO (library name or path) into a CD-ROM drive; works while running."""
    client = api()
    run_job(
        client, client.post(f"/vms/{vm}/cdroms/{drive}/insert", json={"iso": iso}), output, wait
    )
    if wait and output == Output.table:
        out.print(f"{vm} cdrom{drive}: {iso}")


@cdrom_app.command("eject")
def cdrom_eject(
    vm: str, drive: DriveOpt = 0, wait: WaitOpt = True, output: OutputOpt = Output.table
) -> None:
    """Eject the medium from a CD-ROM drive; works while running."""
    client = api()
    run_job(client, client.post(f"/vms/{vm}/cdroms/{drive}/eject"), output, wait)
    if wait and output == Output.table:
        out.print(f"{vm} cdrom{drive}: ejected")
