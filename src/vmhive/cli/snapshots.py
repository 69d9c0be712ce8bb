"""`vmhive snapshot ...`: take, list (as a tree), show, revert, delete, schedule."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Column, Table

from vmhive.cli.common import Output, OutputOpt, WaitOpt, api, human_size, out, print_json, run_job

snapshot_app = typer.Typer(
    help="Snapshots: points in time of a VM to revert to, as a tree.", no_args_is_help=True
)


def _path(vm: str, snapshot: str | None = None) -> str:
    base = f"/vms/{quote(vm, safe='')}/snapshots"
    return base if snapshot is None else f"{base}/{quote(snapshot, safe='')}"


def tree_lines(snapshots: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Each snapshot under its parent, in creation order, with its branch drawn.

    >>> snaps = [{"name": "a", "parent": None}, {"name": "b", "parent": "a"},
    ...          {"name": "c", "parent": "a"}, {"name": "d", "parent": "b"}]
    >>> [prefix + s["name"] for prefix, s in tree_lines(snaps)]
    ['a', '├─ b', '│  └─ d', '└─ c']
    """
    known = {s["name"] for s in snapshots}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for snap in snapshots:
        parent = snap["parent"] if snap["parent"] in known else None
        children.setdefault(parent, []).append(snap)
    lines: list[tuple[str, dict[str, Any]]] = []

    def walk(parent: str | None, indent: str) -> None:
        kids = children.get(parent, [])
        for n, snap in enumerate(kids):
            last = n == len(kids) - 1
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            lines.append((indent + branch, snap))
            below = "" if parent is None else ("   " if last else "│  ")
            walk(snap["name"], indent + below)

    walk(None, "")
    return lines


@snapshot_app.command("create")
def snapshot_create(
    vm: str,
    name: str,
    memory: Annotated[
        bool, typer.Option("--memory", help="save the RAM and device state too (running VM)")
    ] = False,
    description: Annotated[str, typer.Option(help="free text")] = "",
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Take a snapshot: disk-only by default (the guest pauses for an instant)."""
    client = api()
    body = {"name": name, "memory": memory, "description": description}
    job = run_job(client, client.post(_path(vm), json=body), output, wait)
    if wait and output == Output.table:
        result = job["result"]
        pause = result.get("pause_ms")
        paused = f"; the guest paused {pause:.1f} ms" if pause is not None else ""
        kind = "with RAM" if memory else "disk-only"
        out.print(f"snapshot {name} of {vm} taken ({kind}{paused})")


@snapshot_app.command("list")
def snapshot_list(vm: str, output: OutputOpt = Output.table) -> None:
    """The VM's snapshots as a tree; `*` marks the one its present state descends from."""
    snapshots = api().get(_path(vm))
    if output == Output.json:
        print_json(snapshots)
        return
    if not snapshots:
        out.print(f"{vm} has no snapshots")
        return
    table = Table(
        Column("name", no_wrap=True),
        Column("taken (UTC)", no_wrap=True),
        "RAM",
        Column("size", no_wrap=True),
        "VM was",
        "description",
    )
    for prefix, snap in tree_lines(snapshots):
        marks = (" *" if snap["current"] else "") + (
            f" ({snap['status']})" if snap["status"] != "ready" else ""
        )
        table.add_row(
            prefix + snap["name"] + marks,
            snap["created_at"][:16].replace("T", " "),
            "yes" if snap["with_memory"] else "no",
            human_size(snap["size_bytes"]),
            snap["vm_state"],
            snap["description"],
        )
    out.print(table)


@snapshot_app.command("show")
def snapshot_show(vm: str, name: str, output: OutputOpt = Output.table) -> None:
    """One snapshot: when, what it holds, its parent."""
    snap = api().get(_path(vm, name))
    if output == Output.json:
        print_json(snap)
        return
    table = Table(show_header=False, box=None)
    for key in ("name", "parent", "current", "created_at", "description", "with_memory"):
        table.add_row(key, str(snap[key]))
    table.add_row("vm state then", snap["vm_state"])
    table.add_row("size", human_size(snap["size_bytes"]))
    pause = snap["pause_ms"]
    table.add_row("guest paused", "-" if pause is None else f"{pause:.1f} ms")
    table.add_row("hardware", f"{snap['vcpus']} vCPU, {snap['memory_mib']} MiB")
    for index, disk in enumerate(snap["disks"]):
        table.add_row(f"disk{index}", disk)
    table.add_row("schedule", snap["schedule"] or "-")
    table.add_row("status", snap["status"])
    out.print(table)


@snapshot_app.command("revert")
def snapshot_revert(
    vm: str,
    name: str,
    start: Annotated[
        bool, typer.Option(help="start the VM afterwards (a snapshot with RAM always resumes)")
    ] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Go back to a snapshot (any in the tree). A running VM is forced off first."""
    client = api()
    job = client.post(f"{_path(vm, name)}/revert", json={"start": start})
    job = run_job(client, job, output, wait)
    if wait and output == Output.table:
        state = "running" if job["result"]["started"] else "stopped"
        out.print(f"{vm} reverted to snapshot {name} ({state})")


@snapshot_app.command("delete")
def snapshot_delete(
    vm: str, name: str, wait: WaitOpt = True, output: OutputOpt = Output.table
) -> None:
    """Delete a snapshot; every other snapshot stays revertable."""
    client = api()
    run_job(client, client.delete(_path(vm, name)), output, wait)
    if wait and output == Output.table:
        out.print(f"snapshot {name} of {vm} deleted")


def _schedule_path(vm: str, every: str | None = None) -> str:
    base = f"/vms/{quote(vm, safe='')}/snapshot-schedules"
    return base if every is None else f"{base}/{quote(every, safe='')}"


@snapshot_app.command("schedule")
def snapshot_schedule(
    vm: str,
    every: Annotated[str, typer.Option(help="period: e.g. 15m, 1h, 1d, 1w, hourly, daily, weekly")],
    keep: Annotated[int, typer.Option(help="how many of this schedule's snapshots to keep")],
    memory: Annotated[bool, typer.Option("--memory", help="with RAM whenever the VM runs")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Take snapshots every period and delete the oldest beyond --keep (run by the daemon)."""
    schedule = api().put(_schedule_path(vm, every), json={"keep": keep, "memory": memory})
    if output == Output.json:
        print_json(schedule)
        return
    out.print(
        f"{vm}: a snapshot every {schedule['every']}, keeping {keep}; "
        f"next at {schedule['next_run_at'][:19].replace('T', ' ')} UTC"
    )


@snapshot_app.command("unschedule")
def snapshot_unschedule(
    vm: str, every: Annotated[str, typer.Option(help="the period of the schedule to remove")]
) -> None:
    """Remove a schedule (its snapshots stay, as ordinary ones)."""
    api().delete(_schedule_path(vm, every))
    out.print(f"{vm}: the schedule every {every} is removed")


@snapshot_app.command("schedules")
def snapshot_schedules(vm: str, output: OutputOpt = Output.table) -> None:
    """The VM's snapshot schedules."""
    schedules = api().get(_schedule_path(vm))
    if output == Output.json:
        print_json(schedules)
        return
    table = Table("every", "keep", "RAM", "snapshots", "last run (UTC)", "next run (UTC)")
    for s in schedules:
        table.add_row(
            s["every"], str(s["keep"]), "yes" if s["memory"] else "no", str(s["snapshots"]),
            (s["last_run_at"] or "-")[:19].replace("T", " "),
            s["next_run_at"][:19].replace("T", " "),
        )  # fmt: skip
    out.print(table)
