"""`vmhive image ...`: the image store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

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

image_app = typer.Typer(help="Base images.", no_args_is_help=True)


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
