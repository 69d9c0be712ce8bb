"""What every CLI command shares: output, the API client, job following."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from vmhive.cli.client import Api, ApiTarget

out = Console()
err = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="wait for the job to finish")]


class State:
    api: str | None = None
    token: str | None = None
    data_dir: Path | None = None


state = State()


def api() -> Api:
    return Api(ApiTarget.resolve(state.api, state.token, state.data_dir))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_job(client: Api, job: dict[str, Any], output: Output, wait: bool = True) -> dict[str, Any]:
    """Follow a job with a progress bar (tables) or silently (json)."""
    if not wait:
        if output == Output.json:
            print_json(job)
        else:
            out.print(f"job {job['id']} ({job['kind']}) {job['state']}")
        return job
    if output == Output.json or not sys.stderr.isatty():
        job = client.wait_job(job)
    else:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task(job["kind"], total=100)
            job = client.wait_job(job, lambda j: bar.update(task, completed=j["progress"]))
    if output == Output.json:
        print_json(job)
    return job


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)
