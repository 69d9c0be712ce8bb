"""cloud-init settings: users, SSH keys, password hashes, network-config, seed rebuilds.

The tiny guest reads the NoCloud seed itself (its rcS), so these run in the
fast tier; the Debian image's real cloud-init is tested in test_debian_image.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional

ALICE_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJHmv3WKihOIZp4SXi5wlLv/IbXAUjf0JS8fPAE/lju alice@laptop"
)
ROOT_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINTVDRABZfbPLnix0Fta7Q2s+N8Evqvyh6Z6dlG+ASmr ops@desk"
)
HASH = (
    "$6$vmhive$3Fv0mQ1kq0xJ8z5mY2uWbQp9oYtC/4x6m6zvQqP0x9yq4dQeQv2v4o1uP5Zk3oZ1cQm7P0x0e.tK7pX3n8u1"
)


def test_users_keys_and_hostname_reach_the_guest(hive: Hive) -> None:
    hive.create_tiny(
        "ci1", 1, "--hostname", "web-01", "--user", "alice", "--ssh-key", ALICE_KEY,
        "--password-hash", HASH, "--ipconfig", "ip=10.9.0.5/24,gw=10.9.0.1",
        "--nameserver", "10.9.0.1", "--start",
    )  # fmt: skip
    hive.wait_ready("ci1")
    assert hive.run_in_guest("ci1", "hostname") == "web-01"
    assert hive.run_in_guest("ci1", "cat /home/alice/.ssh/authorized_keys") == ALICE_KEY
    assert hive.run_in_guest("ci1", "grep ^alice: /etc/shadow | cut -d: -f2") == HASH
    assert hive.run_in_guest("ci1", "stat -c %U:%a /home/alice/.ssh/authorized_keys") == (
        "alice:600"
    )

    seed = hive.cli("vm", "cloud-init", "show", "ci1", "-o", "json").json()
    assert seed["enabled"] and seed["settings"]["users"][0]["name"] == "alice"
    network = seed["files"]["network-config"]
    mac = hive.vm("ci1")["nics"][0]["mac"]
    assert f'macaddress: "{mac}"' in network and '"10.9.0.5/24"' in network
    assert 'via: "10.9.0.1"' in network and '"10.9.0.1"' in network.split("nameservers")[1]
    first_id = seed["instance_id"]

    # Changed settings while it runs: the seed is rebuilt and swapped in, with
    # a new instance-id, so the guest applies them at its next boot.
    hive.cli("vm", "cloud-init", "set", "ci1", "--hostname", "web-02", "--ssh-key", ROOT_KEY)
    after = hive.cli("vm", "cloud-init", "show", "ci1", "-o", "json").json()
    assert after["instance_id"] != first_id
    assert after["settings"]["users"][0]["ssh_authorized_keys"] == [ALICE_KEY], "kept"
    assert f'"{ROOT_KEY}"' in after["files"]["meta-data"]
    # The running guest sees the new seed on its CD-ROM at once (the first read
    # after a media change reports it, as on real drives: hence the retry).
    mount = "for i in 1 2 3; do mount -t iso9660 -r /dev/sr0 /tmp/m 2>/dev/null && break; done"
    seen = hive.run_in_guest(
        "ci1", f"mkdir -p /tmp/m; {mount}; cat /tmp/m/meta-data; umount /tmp/m"
    )
    assert '"web-02"' in seen
    hive.cli("vm", "reset", "ci1")
    hive.wait_ready("ci1", count=2)
    assert hive.run_in_guest("ci1", "hostname") == "web-02"
    assert hive.run_in_guest("ci1", "cat /root/.ssh/authorized_keys") == ROOT_KEY
    assert hive.vm("ci1")["cloud_init_instance_id"] == after["instance_id"]
    hive.cli("vm", "delete", "ci1", "--force")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--ssh-key", "ssh-ed25519 not a key!"), "not an OpenSSH public key"),
        (("--user", "alice", "--password-hash", "hunter2"), "must be a crypt hash"),
        (("--user", "root"), "bad user name 'root'"),
        (("--hostname", "bad_host"), "bad hostname"),
        (("--ipconfig", "ip=10.0.0.5"), "bad static address for NIC 0"),
        (("--ipconfig", "ip=10.0.0.5/24,gw=192.168.0.1"), "outside 10.0.0.0/24"),
        (("--ipconfig", "dhcp", "--ipconfig", "dhcp"), "ipconfig for NIC 1"),
        (("--password-hash", HASH), "--password-hash needs --user"),
    ],
)
def test_bad_cloud_init_settings_are_refused_and_change_nothing(
    hive: Hive, flags: tuple[str, ...], message: str
) -> None:
    result = hive.cli(
        "vm", "create", "bad", "--image", "tiny", "--memory", "128", "-g", "1", *flags, check=False
    )
    assert result.rc == 1 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "bad" not in [vm["name"] for vm in hive.cli("vm", "list", "-o", "json").json()]


def test_settings_change_on_a_stopped_vm_and_removal(hive: Hive) -> None:
    hive.create_tiny("ci2", 1)
    assert not hive.vm("ci2")["cloud_init"]
    hive.cli("vm", "cloud-init", "set", "ci2", "--user", "bob", "--ssh-key", ALICE_KEY)
    vm = hive.vm("ci2")
    assert vm["cloud_init"] and vm["cloud_init_instance_id"]
    bad = hive.api("PUT", "/api/vms/ci2/cloud-init", json={"users": [{"name": "x y"}]})
    assert bad.status_code == 422 and "bad user name" in bad.json()["detail"]
    shown = hive.cli("vm", "cloud-init", "show", "ci2", "-o", "json").json()
    assert [u["name"] for u in shown["settings"]["users"]] == ["bob"], "refused PUT changed nothing"
    hive.cli("vm", "start", "ci2")
    hive.wait_ready("ci2")
    assert hive.run_in_guest("ci2", "cat /home/bob/.ssh/authorized_keys") == ALICE_KEY
    busy = hive.cli("vm", "cloud-init", "remove", "ci2", check=False)
    assert busy.rc == 1 and "stop it" in busy.err
    hive.cli("vm", "force-stop", "ci2")
    hive.cli("vm", "cloud-init", "remove", "ci2")
    assert not hive.vm("ci2")["cloud_init"]
    assert json.loads(hive.cli("vm", "cloud-init", "show", "ci2", "-o", "json").out)["files"] == {}
    hive.cli("vm", "delete", "ci2")
