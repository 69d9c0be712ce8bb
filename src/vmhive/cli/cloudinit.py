"""`vmhive vm cloud-init show|set|remove`, and the cloud-init flags of `vm create`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vmhive.cli.client import CliError
from vmhive.cli.common import Output, OutputOpt, WaitOpt, api, out, print_json, run_job

cloudinit_app = typer.Typer(help="A VM's cloud-init (NoCloud) settings.", no_args_is_help=True)

HostnameOpt = Annotated[str | None, typer.Option(help="guest hostname (default: the VM's name)")]
UserOpt = Annotated[
    str | None, typer.Option("--user", help="create this user (keys and password go to it)")
]
KeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--ssh-key",
        help="an OpenSSH public key, or a file of them (repeatable); without --user "
        "they go to the image's default user",
    ),
]
PasswordOpt = Annotated[
    str | None,
    typer.Option(help="the user's password as a crypt hash (mkpasswd -m sha-512)"),
]
UserDataOpt = Annotated[
    Path | None, typer.Option(help="your own user-data file, replacing vmhive's")
]
NetworkConfigOpt = Annotated[
    Path | None, typer.Option(help="your own network-config file (v1 or v2)")
]
IpconfigOpt = Annotated[
    list[str] | None,
    typer.Option(help="per NIC, in order (repeatable): dhcp, or ip=10.0.0.5/24[,gw=10.0.0.1]"),
]
NameserverOpt = Annotated[
    list[str] | None, typer.Option("--nameserver", help="DNS server (repeatable)")
]


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None


def read_keys(items: list[str]) -> list[str]:
    """Keys given inline, or files holding one key a line (like authorized_keys)."""
    keys: list[str] = []
    for item in items:
        if item.startswith(("ssh-", "ecdsa-", "sk-")):
            keys.append(item.strip())
            continue
        text = read_text(Path(item))
        keys += [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    return keys


def apply_flags(
    settings: dict[str, Any],
    *,
    hostname: str | None = None,
    user: str | None = None,
    ssh_key: list[str] | None = None,
    password_hash: str | None = None,
    user_data: Path | None = None,
    network_config: Path | None = None,
    ipconfig: list[str] | None = None,
    nameserver: list[str] | None = None,
) -> dict[str, Any]:
    """The settings with what the flags say; a flag not given keeps what is there."""
    settings = dict(settings)
    if hostname is not None:
        settings["hostname"] = hostname
    keys = read_keys(ssh_key) if ssh_key else None
    if user is not None:
        users = [u for u in settings.get("users") or [] if u["name"] != user]
        existing: dict[str, Any] = next(
            (u for u in settings.get("users") or [] if u["name"] == user), {}
        )
        users.append(
            {
                "name": user,
                "ssh_authorized_keys": keys
                if keys is not None
                else existing.get("ssh_authorized_keys", []),
                "hashed_passwd": password_hash or existing.get("hashed_passwd"),
                "sudo": True,
            }
        )
        settings["users"] = users
    else:
        if password_hash is not None:
            raise CliError("--password-hash needs --user")
        if keys is not None:
            settings["ssh_keys"] = keys
    if user_data is not None:
        settings["user_data"] = read_text(user_data)
    if network_config is not None:
        settings["network_config"] = read_text(network_config)
    if ipconfig:
        settings["ipconfig"] = ipconfig
    if nameserver:
        settings["nameservers"] = nameserver
    return settings


@cloudinit_app.command("show")
def cloudinit_show(name: str, output: OutputOpt = Output.table) -> None:
    """The settings and the seed's files, exactly as the guest reads them."""
    data = api().get(f"/vms/{name}/cloud-init")
    if output == Output.json:
        print_json(data)
        return
    out.print(f"enabled:      {data['enabled']}")
    out.print(f"instance-id:  {data['instance_id'] or '-'}")
    for file, text in data["files"].items():
        out.print(f"--- {file}", markup=False)
        out.print(text.rstrip("\n"), markup=False, highlight=False)


@cloudinit_app.command("set")
def cloudinit_set(
    name: str,
    hostname: HostnameOpt = None,
    user: UserOpt = None,
    ssh_key: KeyOpt = None,
    password_hash: PasswordOpt = None,
    user_data: UserDataOpt = None,
    network_config: NetworkConfigOpt = None,
    ipconfig: IpconfigOpt = None,
    nameserver: NameserverOpt = None,
    clear_user_data: Annotated[bool, typer.Option(help="go back to vmhive's user-data")] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Output.table,
) -> None:
    """Change cloud-init settings (enabling cloud-init); the seed is rebuilt at once."""
    client = api()
    current = client.get(f"/vms/{name}/cloud-init")["settings"]
    if clear_user_data:
        current["user_data"] = None
    settings = apply_flags(
        current,
        hostname=hostname,
        user=user,
        ssh_key=ssh_key,
        password_hash=password_hash,
        user_data=user_data,
        network_config=network_config,
        ipconfig=ipconfig,
        nameserver=nameserver,
    )
    job = run_job(client, client.put(f"/vms/{name}/cloud-init", json=settings), output, wait)
    if wait and output == Output.table:
        out.print(f"cloud-init of {name} set (instance-id {job['result']['instance_id']})")


@cloudinit_app.command("remove")
def cloudinit_remove(name: str, wait: WaitOpt = True, output: OutputOpt = Output.table) -> None:
    """Remove the seed drive of a stopped VM (its settings are kept)."""
    client = api()
    run_job(client, client.delete(f"/vms/{name}/cloud-init"), output, wait)
    if wait and output == Output.table:
        out.print(f"cloud-init drive of {name} removed")
