"""`vmhive job ...`: list, show, wait, cancel."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Column, Table

from vmhive.cli.common import (
    Output,
    OutputOpt,
    api,
    out,
    print_json,
    run_job,
)

job_app = typer.Typer(help="Jobs: every change runs as one.", no_args_is_help=True)


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
