"""`vmhive`: a thin command-line client of the REST API (plus `serve` itself)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vmhive.cli.client import CliError
from vmhive.cli.common import (
    Output,
    OutputOpt,
    api,
    err,
    out,
    print_json,
    state,
)
from vmhive.cli.images import image_app
from vmhive.cli.jobs import job_app
from vmhive.cli.network import host_cleanup, network_app
from vmhive.cli.nodes import node_app
from vmhive.cli.snapshots import snapshot_app
from vmhive.cli.storage import iso_app, pool_app, volume_app
from vmhive.cli.users import user_app
from vmhive.cli.vms import vm_app
from vmhive.config import DEFAULT_LISTEN, Settings, default_data_dir

app = typer.Typer(help="vmhive: manage QEMU/KVM virtual machines.", no_args_is_help=True)
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


@app.command()
def serve(
    data_dir: Annotated[
        Path | None, typer.Option(help="where state lives; env VMHIVE_DATA_DIR")
    ] = None,
    listen: Annotated[str, typer.Option(help="TCP address of the API")] = DEFAULT_LISTEN,
    db: Annotated[
        str | None,
        typer.Option(
            help="database URL, e.g. postgresql://USER@HOST/DBNAME (default: SQLite in the data dir)"
        ),
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
    metrics_interval: Annotated[
        float, typer.Option(help="seconds between metrics samples of the host and VMs")
    ] = 5.0,
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
        metrics_interval=metrics_interval,
        node_name=node_name,
        node_address=node_address,
    )
    try:
        settings.check()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    from vmhive.store.db import DatabaseUnavailable

    try:
        asyncio.run(serve_daemon(settings))
    except DatabaseUnavailable as exc:
        raise CliError(str(exc)) from None


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
