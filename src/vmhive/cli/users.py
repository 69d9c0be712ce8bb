"""`vmhive user ...`: the web UI's logins."""

from __future__ import annotations

import sys
from typing import Annotated
from urllib.parse import quote

import typer
from rich.table import Table

from vmhive.cli.client import CliError
from vmhive.cli.common import Output, OutputOpt, api, out, print_json

user_app = typer.Typer(help="Users who log in to the web UI.", no_args_is_help=True)

PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="read the password from standard input (one line)"),
]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CliError("no password on standard input")
        return line
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for a password: use --password-stdin")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@user_app.command("list")
def user_list(output: OutputOpt = Output.table) -> None:
    """List the users."""
    users = api().get("/users")
    if output == Output.json:
        print_json(users)
        return
    table = Table("NAME", "CREATED", box=None)
    for user in users:
        table.add_row(user["name"], user["created_at"][:19].replace("T", " "))
    out.print(table)


@user_app.command("add")
def user_add(name: str, password_stdin: PasswordStdin = False) -> None:
    """Add a user (asks for the password, or reads it with --password-stdin)."""
    api().post("/users", json={"name": name, "password": _password(password_stdin)})
    out.print(f"user {name} added")


@user_app.command("passwd")
def user_passwd(name: str, password_stdin: PasswordStdin = False) -> None:
    """Set a user's password; the user's open sessions end."""
    path = f"/users/{quote(name, safe='')}/password"
    api().put(path, json={"password": _password(password_stdin)})
    out.print(f"password of {name} changed")


@user_app.command("delete")
def user_delete(name: str) -> None:
    """Delete a user (not the last one)."""
    api().delete(f"/users/{quote(name, safe='')}")
    out.print(f"user {name} deleted")
