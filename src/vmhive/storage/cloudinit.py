"""Cloud-init NoCloud seeds: a small ISO labelled `cidata`.

The seed holds `meta-data` (instance-id, local-hostname, public-keys),
`user-data` (a #cloud-config vmhive writes from the VM's settings, or the
user's own text passed through) and, when configured, `network-config`
(version 2). cloud-init and the tiny guest's own reader find it by its label.

The instance-id is the VM's cloud-init id plus a digest of the seed's
content: a clone (new id) or a change of settings (new digest) makes the
guest run its per-instance configuration again, as on Proxmox.

vmhive writes every YAML scalar as a JSON string (JSON is YAML), one item
a line, so the tiny guest's shell reader can parse what vmhive wrote.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pycdlib

SEED_LABEL = "cidata"
MAX_USER_DATA = 64 * 1024
MAX_USERS = 8
MAX_KEYS = 32

USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
RESERVED_USERS = frozenset({"root", "daemon", "bin", "sys", "nobody", "sshd"})
HOSTNAME_RE = re.compile(r"(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")
KEY_RE = re.compile(
    r"(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,3}( [^\x00-\x1f\"\\\x7f]{0,200})?"
)
# crypt(3) hashes: yescrypt, sha512, sha256, bcrypt, md5.
HASH_RE = re.compile(r"\$(y|6|5|2[aby]|1)\$[./A-Za-z0-9$=,]{8,200}")


class CloudInitError(ValueError):
    """Settings that cannot go into a seed; the message says which and why."""


@dataclass(frozen=True)
class CloudUser:
    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    hashed_passwd: str | None = None
    sudo: bool = True


@dataclass(frozen=True)
class IpConfig:
    """The address of one NIC: DHCP, or a static CIDR with an optional gateway."""

    nic: int = 0
    dhcp: bool = True
    address: str | None = None
    gateway: str | None = None


@dataclass(frozen=True)
class CloudInitConfig:
    hostname: str | None = None  # None: the VM's name
    users: tuple[CloudUser, ...] = ()
    ssh_keys: tuple[str, ...] = ()  # the image's default user (meta-data public-keys)
    user_data: str | None = None  # the user's own user-data, passed through as is
    network_config: str | None = None  # the user's own network-config, passed through
    ipconfig: tuple[IpConfig, ...] = ()
    nameservers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CloudInitConfig:
        data = dict(data or {})
        return cls(
            hostname=data.get("hostname"),
            users=tuple(
                CloudUser(
                    name=u["name"],
                    ssh_authorized_keys=tuple(u.get("ssh_authorized_keys") or ()),
                    hashed_passwd=u.get("hashed_passwd"),
                    sudo=bool(u.get("sudo", True)),
                )
                for u in data.get("users") or ()
            ),
            ssh_keys=tuple(data.get("ssh_keys") or ()),
            user_data=data.get("user_data"),
            network_config=data.get("network_config"),
            ipconfig=tuple(IpConfig(**c) for c in data.get("ipconfig") or ()),
            nameservers=tuple(data.get("nameservers") or ()),
        )


def check_ssh_key(key: str) -> str:
    """A one-line OpenSSH public key whose blob names the same key type as its text."""
    key = key.strip()
    match = KEY_RE.fullmatch(key)
    blob = b""
    if match:
        with contextlib.suppress(binascii.Error):
            blob = base64.b64decode(key.split(" ")[1], validate=True)
    kind = match.group(1).encode() if match else b""
    if not match or blob[4 : 4 + len(kind)] != kind or int.from_bytes(blob[:4]) != len(kind):
        raise CloudInitError(
            f"not an OpenSSH public key: {key[:40]!r}... (expected 'ssh-ed25519 AAAA... comment')"
        )
    return key


def parse_ipconfig(text: str, nic: int = 0) -> IpConfig:
    """`dhcp`, or `ip=10.0.0.5/24[,gw=10.0.0.1]` as Proxmox writes it."""
    text = text.strip()
    if text in ("dhcp", "ip=dhcp"):
        return IpConfig(nic=nic)
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("ip", "gw") or key in fields:
            raise CloudInitError(f"bad ipconfig {text!r}: use dhcp or ip=CIDR[,gw=ADDRESS]")
        fields[key] = value
    if "ip" not in fields:
        raise CloudInitError(f"bad ipconfig {text!r}: ip=CIDR is missing")
    return IpConfig(nic=nic, dhcp=False, address=fields["ip"], gateway=fields.get("gw"))


def format_ipconfig(ip: IpConfig) -> str:
    if ip.dhcp:
        return "dhcp"
    return f"ip={ip.address}" + (f",gw={ip.gateway}" if ip.gateway else "")


def validate(config: CloudInitConfig, nics: int) -> None:
    """Raise CloudInitError for anything a guest could not use or vmhive not write safely."""
    if config.hostname is not None and not HOSTNAME_RE.fullmatch(config.hostname):
        raise CloudInitError(f"bad hostname {config.hostname!r}: letters, digits and '-'")
    if len(config.users) > MAX_USERS:
        raise CloudInitError(f"at most {MAX_USERS} users")
    names = [u.name for u in config.users]
    if len(set(names)) != len(names):
        raise CloudInitError("a user is listed twice")
    for user in config.users:
        if not USER_RE.fullmatch(user.name) or user.name in RESERVED_USERS:
            raise CloudInitError(f"bad user name {user.name!r}")
        if user.hashed_passwd is not None and not HASH_RE.fullmatch(user.hashed_passwd):
            raise CloudInitError(
                f"the password of {user.name} must be a crypt hash "
                "(e.g. from `mkpasswd -m sha-512` or `openssl passwd -6`), never plain text"
            )
    keys = [k for u in config.users for k in u.ssh_authorized_keys] + list(config.ssh_keys)
    if len(keys) > MAX_KEYS:
        raise CloudInitError(f"at most {MAX_KEYS} SSH keys")
    for key in keys:
        if check_ssh_key(key) != key:
            raise CloudInitError("SSH keys must not carry surrounding blanks")
    for text, what in ((config.user_data, "user-data"), (config.network_config, "network-config")):
        if text is not None and len(text.encode()) > MAX_USER_DATA:
            raise CloudInitError(f"{what} is limited to {MAX_USER_DATA} bytes")
    if config.network_config is not None and config.ipconfig:
        raise CloudInitError("give either a network-config or ipconfig entries, not both")
    seen: set[int] = set()
    for ip in config.ipconfig:
        if not 0 <= ip.nic < nics:
            raise CloudInitError(f"ipconfig for NIC {ip.nic}, but the VM has {nics} NIC(s)")
        if ip.nic in seen:
            raise CloudInitError(f"two ipconfig entries for NIC {ip.nic}")
        seen.add(ip.nic)
        if ip.dhcp:
            continue
        try:
            iface = ipaddress.IPv4Interface(ip.address or "")
            if "/" not in (ip.address or ""):
                raise ValueError("no prefix length")
            if ip.gateway is not None:
                gateway = ipaddress.IPv4Address(ip.gateway)
                if gateway not in iface.network:
                    raise ValueError(f"gateway {gateway} is outside {iface.network}")
        except ValueError as exc:
            raise CloudInitError(f"bad static address for NIC {ip.nic}: {exc}") from None
    for server in config.nameservers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise CloudInitError(f"bad nameserver {server!r}") from None


def _q(text: str) -> str:
    return json.dumps(text)


def render_user_data(config: CloudInitConfig, hostname: str) -> str:
    if config.user_data is not None:
        return config.user_data
    lines = ["#cloud-config", f"hostname: {_q(hostname)}", "preserve_hostname: false"]
    if config.users:
        lines += ["users:", "  - default"]
        for user in config.users:
            lines.append(f"  - name: {_q(user.name)}")
            lines.append('    shell: "/bin/bash"')
            if user.sudo:
                lines.append('    sudo: "ALL=(ALL) NOPASSWD:ALL"')
            if user.hashed_passwd:
                lines.append("    lock_passwd: false")
                lines.append(f"    hashed_passwd: {_q(user.hashed_passwd)}")
            if user.ssh_authorized_keys:
                lines.append("    ssh_authorized_keys:")
                lines += [f"      - {_q(key)}" for key in user.ssh_authorized_keys]
    if any(u.hashed_passwd for u in config.users):
        lines.append("ssh_pwauth: true")
    return "\n".join(lines) + "\n"


def render_meta_data(config: CloudInitConfig, instance_id: str, hostname: str) -> str:
    lines = [f"instance-id: {_q(instance_id)}", f"local-hostname: {_q(hostname)}"]
    if config.ssh_keys:
        lines.append("public-keys:")
        lines += [f"  - {_q(key)}" for key in config.ssh_keys]
    return "\n".join(lines) + "\n"


def render_network_config(config: CloudInitConfig, macs: list[str]) -> str | None:
    if config.network_config is not None:
        return config.network_config
    if not config.ipconfig:
        return None
    lines = ["version: 2", "ethernets:"]
    for ip in sorted(config.ipconfig, key=lambda c: c.nic):
        lines.append(f"  nic{ip.nic}:")
        lines.append(f"    match: {{macaddress: {_q(macs[ip.nic])}}}")
        if ip.dhcp:
            lines.append("    dhcp4: true")
            continue
        lines.append("    dhcp4: false")
        lines.append(f"    addresses: [{_q(ip.address or '')}]")
        if ip.gateway:
            lines.append("    routes:")
            lines.append(f"      - {{to: {_q('0.0.0.0/0')}, via: {_q(ip.gateway)}}}")
        if config.nameservers:
            servers = ", ".join(_q(s) for s in config.nameservers)
            lines.append(f"    nameservers: {{addresses: [{servers}]}}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Seed:
    instance_id: str
    files: dict[str, str]


def render(config: CloudInitConfig, *, base_id: str, vm_name: str, macs: list[str]) -> Seed:
    """Every file of the seed; the instance-id changes with their content."""
    hostname = config.hostname or vm_name
    content: dict[str, str] = {"user-data": render_user_data(config, hostname)}
    network = render_network_config(config, macs)
    if network is not None:
        content["network-config"] = network
    digest = hashlib.sha256(
        json.dumps([hostname, list(config.ssh_keys), content], sort_keys=True).encode()
    ).hexdigest()[:12]
    instance_id = f"{base_id}-{digest}"
    return Seed(
        instance_id=instance_id,
        files={"meta-data": render_meta_data(config, instance_id, hostname), **content},
    )


def build_seed_iso(dest: Path, *, instance_id: str, hostname: str, user_data: str | None) -> None:
    """A seed with just a hostname and the given user-data (for tests and tools)."""
    meta = f"instance-id: {_q(instance_id)}\nlocal-hostname: {_q(hostname)}\n"
    user = user_data if user_data is not None else "#cloud-config\n{}\n"
    write_seed_iso(dest, Seed(instance_id, {"meta-data": meta, "user-data": user}))


def write_seed_iso(dest: Path, seed: Seed) -> None:
    """Write the seed ISO atomically (a temp file renamed into place)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        for name, text in seed.files.items():
            data = text.encode()
            iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
        iso.write(str(tmp))
    finally:
        iso.close()
    os.chmod(tmp, 0o600)
    tmp.replace(dest)
