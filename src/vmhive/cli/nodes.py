"""`vmhive node ...`: the nodes of a cluster; placement explanations."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from vmhive.cli.common import Output, OutputOpt, WaitOpt, api, human_size, out, print_json, run_job

node_app = typer.Typer(help="Nodes: the hosts of a cluster.", no_args_is_help=True)


def _path(name: str) -> str:
    return f"/nodes/{quote(name, safe='')}"


def _row(node: dict[str, Any]) -> list[str]:
    memory = f"{node['memory_used_mib']}/{node['memory_mib']} MiB"
    status = node["status"] + (", drained" if node["drained"] else "")
    return [
        node["name"] + (" *" if node.get("self") else ""),
        status,
        node["address"],
        f"{node['vcpus_used']}/{node['cpus']}",
        memory,
        human_size(node["storage_free_bytes"]),
        f"{node['running']}/{node['vms']}",
    ]


@node_app.command("list")
def node_list(output: OutputOpt = Output.table) -> None:
    """List the nodes (* marks the one answering)."""
    nodes = api().get("/nodes")
    if output == Output.json:
        print_json(nodes)
        return
    table = Table(
        "NAME", "STATUS", "ADDRESS", "VCPUS", "MEMORY", "STORAGE FREE", "RUNNING/VMS", box=None
    )
    for node in nodes:
        table.add_row(*_row(node))
    out.print(table)


@node_app.command("show")
def node_show(name: str, output: OutputOpt = Output.table) -> None:
    """Show one node."""
    node = api().get(_path(name))
    if output == Output.json:
        print_json(node)
        return
    for key in sorted(node):
        out.print(f"{key}: {node[key]}")


@node_app.command("drain")
def node_drain(name: str, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
    """Admit no new VMs on a node and live-migrate its running VMs away."""
    client = api()
    answer = client.post(_path(name) + "/drain")
    if "kind" in answer:  # a job on that node
        run_job(client, answer, output, wait)
    if output == Output.table and (wait or "kind" not in answer):
        out.print(f"node {name} drained: no new VMs are placed there, its running VMs moved")


@node_app.command("undrain")
def node_undrain(name: str) -> None:
    """Admit new VMs on a node again."""
    api().post(_path(name) + "/undrain")
    out.print(f"node {name} admits new VMs again")


@node_app.command("remove")
def node_remove(name: str) -> None:
    """Forget a node that is gone (offline, owning no VM)."""
    api().delete(_path(name))
    out.print(f"node {name} removed")


def print_placement(verdict: dict[str, Any], output: Output) -> None:
    if output == Output.json:
        print_json(verdict)
        return
    table = Table("NODE", "FITS", "SCORE", "WHY", box=None)
    for c in verdict["considered"]:
        score = "" if c["score"] is None else f"{c['score']:.3f}"
        table.add_row(c["node"], "yes" if c["fits"] else "no", score, c["reason"])
    out.print(table)
    out.print(f"placement ({verdict['strategy']}): {verdict['explanation']}")
