"""Daemon settings: one explicit object handed down, never a global."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from vmhive.store.urls import normalize_db_url

DEFAULT_DATA_DIR = Path("/var/lib/vmhive")
DEFAULT_LISTEN = "127.0.0.1:8006"
# AF_UNIX paths are limited to 107 bytes; the longest socket we create is
# <data-dir>/run/<uuid>/serial.sock, so the data dir must stay well below that.
MAX_DATA_DIR_LEN = 60


def default_data_dir() -> Path:
    return Path(os.environ.get("VMHIVE_DATA_DIR", str(DEFAULT_DATA_DIR)))


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    db_url: str | None = None  # None: SQLite in the data dir; see store.urls
    listen: str = DEFAULT_LISTEN
    accel: str = "auto"  # auto | kvm | tcg
    image_dir: Path | None = None  # None: <data-dir>/images
    create_demo: bool = True
    default_network: bool = False  # a nat network "default" on first start (`serve` sets it)
    stop_timeout: float = 60.0  # graceful ACPI power-off before forcing
    reconcile_interval: float = 5.0
    metrics_interval: float = 5.0  # seconds between samples of the host and every VM
    serial_log_max_bytes: int = 1024 * 1024
    node_name: str | None = None  # None: the host name
    node_address: str | None = None  # host:port other nodes reach this API at; None: listen

    @property
    def db_path(self) -> Path:
        return self.data_dir / "vmhive.db"

    @property
    def database_url(self) -> str:
        if self.db_url:
            return normalize_db_url(self.db_url)
        return f"sqlite+aiosqlite:///{self.db_path}"

    @property
    def api_socket(self) -> Path:
        return self.data_dir / "api.sock"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def images(self) -> Path:
        return self.image_dir or self.data_dir / "images"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def run_root(self) -> Path:
        return self.data_dir / "run"

    @property
    def net_run_dir(self) -> Path:
        """dnsmasq's files: world-searchable (dnsmasq drops root), per daemon, and
        on tmpfs, so the first start after a host reboot builds networks afresh."""
        key = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/run/vmhive") / key

    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--listen must be HOST:PORT, got {self.listen!r}")
        return host.strip("[]"), int(port)

    def check(self) -> None:
        if len(str(self.data_dir.resolve())) > MAX_DATA_DIR_LEN:
            raise ValueError(
                f"data dir {self.data_dir} is too long for unix socket paths "
                f"(at most {MAX_DATA_DIR_LEN} characters)"
            )
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"--accel must be auto, kvm or tcg, got {self.accel!r}")
        if not 0.1 <= self.metrics_interval <= 600:
            raise ValueError(
                f"--metrics-interval must be between 0.1 and 600 seconds, got {self.metrics_interval}"
            )
        self.listen_host_port()
        if self.db_url:
            normalize_db_url(self.db_url)
