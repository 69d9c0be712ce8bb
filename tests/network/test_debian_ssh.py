"""Slow tier: the Debian image's real cloud-init, a NAT network and a port forward.

A Debian 12 VM gets a user with an SSH key from its cloud-init seed, sits on a
vmhive nat network inside a namespace that plays the host, and `ssh` from that
host to 127.0.0.1:2222 (forwarded to the VM's port 22) logs in; `hostname`
answers with the name cloud-init set.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.hive import Hive, wait_for
from tests.network.conftest import NetnsFactory
from tests.network.helpers import kill_and_wait, processes_with_arg_prefix
from vmhive.config import Settings

pytestmark = [pytest.mark.network, pytest.mark.functional, pytest.mark.slow]

SSH_DEADLINE = 900.0  # Debian with systemd and cloud-init under TCG: a few minutes


@pytest.fixture
def daemon(netns: NetnsFactory, debian_image_dir: Path) -> Iterator[tuple[Hive, str]]:
    host = netns("host")
    hive = Hive(debian_image_dir, netns=host.name)
    run_dir = Settings(data_dir=hive.data_dir).net_run_dir
    hive.start()
    try:
        yield hive, host.name
    finally:
        hive.close()
        for pid in processes_with_arg_prefix(f"--conf-file={run_dir}/"):
            kill_and_wait(pid)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_ssh_through_a_port_forward_into_a_debian_vm(
    daemon: tuple[Hive, str], tmp_path: Path
) -> None:
    hive, netns = daemon
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    hive.cli("network", "create", "lab", "--subnet", "10.77.30.0/24")
    hive.cli(
        "vm", "create", "deb", "--image", "debian", "--disk-size", "4G", "-g", "2",
        "--memory", "768", "--network", "lab", "--ip", "10.77.30.10",
        "--hostname", "deb-cloud", "--user", "ops", "--ssh-key", str(key.with_suffix(".pub")),
        "--start",
    )  # fmt: skip
    hive.cli("network", "forward", "add", "lab", "--host-port", "2222", "--vm", "deb",
             "--vm-port", "22")  # fmt: skip
    ssh = [
        "ip", "netns", "exec", netns, "ssh", "-p", "2222", "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "ops@127.0.0.1",
    ]  # fmt: skip

    def logged_in() -> str | None:
        result = subprocess.run([*ssh, "hostname"], capture_output=True, text=True, timeout=60)
        return result.stdout.strip() if result.returncode == 0 else None

    try:
        hostname = wait_for(logged_in, SSH_DEADLINE, "ssh into the Debian VM", interval=5)
    except TimeoutError:
        raise AssertionError(f"no ssh login; console:\n{hive.console_log('deb')[-4000:]}") from None
    assert hostname == "deb-cloud"
    # cloud-init grew the root filesystem to the 4 GiB disk.
    size = subprocess.run(
        [*ssh, "df", "--output=size", "-B1G", "/"], capture_output=True, text=True, timeout=60
    ).stdout.split()[-1]
    assert int(size) >= 3
    assert hive.vm("deb")["nics"][0]["ip"] == "10.77.30.10"

    # The image runs qemu-guest-agent: a disk-only snapshot freezes and thaws its
    # filesystems (application-consistent), and the guest writes on afterwards.
    def agent_froze() -> list[str] | None:
        job = hive.cli("snapshot", "create", "deb", f"s{time.monotonic_ns()}", "-o", "json").json()
        log = [line["message"] for line in job["log"]]
        return log if any("froze" in line for line in log) else None

    log = wait_for(agent_froze, 120, "the guest agent to freeze for a snapshot", interval=5)
    froze = next(line for line in log if "froze" in line)
    assert int(froze.split("froze ")[1].split()[0]) >= 1, log
    assert any("thawed" in line for line in log), log
    writes = subprocess.run([*ssh, "echo after > ~/after && cat ~/after"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert writes.stdout.strip() == "after", writes.stderr
    hive.cli("vm", "delete", "deb", "--force")
    hive.cli("network", "delete", "lab")
