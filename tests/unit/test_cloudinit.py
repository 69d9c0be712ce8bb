"""The NoCloud seed vmhive writes: rendering, instance ids and validation."""

from __future__ import annotations

import pytest

from vmhive.storage.cloudinit import (
    CloudInitConfig,
    CloudInitError,
    CloudUser,
    IpConfig,
    format_ipconfig,
    parse_ipconfig,
    render,
    validate,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJHmv3WKihOIZp4SXi5wlLv/IbXAUjf0JS8fPAE/lju a@b"
HASH = "$6$salt$0123456789abcdef/."
MAC = "52:54:00:12:34:56"


def seed(config: CloudInitConfig, base: str = "base") -> dict[str, str]:
    validate(config, 1)
    return render(config, base_id=base, vm_name="vm1", macs=[MAC]).files


def test_generated_user_data_lists_users_keys_and_password_hashes() -> None:
    files = seed(CloudInitConfig(users=(CloudUser("alice", (KEY,), HASH),)))
    user_data = files["user-data"]
    assert user_data.startswith("#cloud-config\n")
    assert 'hostname: "vm1"' in user_data, "the VM's name by default"
    assert '  - name: "alice"\n' in user_data
    assert f'      - "{KEY}"\n' in user_data
    assert f'    hashed_passwd: "{HASH}"\n' in user_data and "ssh_pwauth: true" in user_data
    assert "network-config" not in files, "no network-config unless asked for"


def test_default_user_keys_go_to_meta_data() -> None:
    files = seed(CloudInitConfig(hostname="web", ssh_keys=(KEY,)))
    assert f'public-keys:\n  - "{KEY}"\n' in files["meta-data"]
    assert 'local-hostname: "web"' in files["meta-data"]


def test_own_user_data_is_passed_through_untouched() -> None:
    text = "#!/bin/sh\necho hi\n"
    assert seed(CloudInitConfig(user_data=text))["user-data"] == text


def test_static_address_network_config_matches_the_nic_by_mac() -> None:
    config = CloudInitConfig(
        ipconfig=(parse_ipconfig("ip=10.0.0.5/24,gw=10.0.0.1"),), nameservers=("10.0.0.1",)
    )
    network = seed(config)["network-config"]
    assert network.startswith("version: 2\n")
    assert f'match: {{macaddress: "{MAC}"}}' in network
    assert 'addresses: ["10.0.0.5/24"]' in network and 'via: "10.0.0.1"' in network
    assert format_ipconfig(config.ipconfig[0]) == "ip=10.0.0.5/24,gw=10.0.0.1"
    assert format_ipconfig(parse_ipconfig("dhcp")) == "dhcp"


def test_instance_id_follows_the_content() -> None:
    a = render(CloudInitConfig(hostname="a"), base_id="x", vm_name="vm", macs=[])
    again = render(CloudInitConfig(hostname="a"), base_id="x", vm_name="vm", macs=[])
    b = render(CloudInitConfig(hostname="b"), base_id="x", vm_name="vm", macs=[])
    clone = render(CloudInitConfig(hostname="a"), base_id="y", vm_name="vm", macs=[])
    assert a.instance_id == again.instance_id
    assert len({a.instance_id, b.instance_id, clone.instance_id}) == 3
    assert a.instance_id.startswith("x-") and a.instance_id in a.files["meta-data"]


def test_json_round_trip() -> None:
    config = CloudInitConfig(
        hostname="h",
        users=(CloudUser("bob", (KEY,), None, False),),
        ssh_keys=(KEY,),
        ipconfig=(IpConfig(0, False, "10.1.0.2/16", None),),
        nameservers=("1.1.1.1",),
    )
    assert CloudInitConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CloudInitConfig(ssh_keys=("ssh-ed25519 AAAAnotakey x",)), "not an OpenSSH public key"),
        (CloudInitConfig(ssh_keys=("ssh-rsa " + KEY.split()[1],)), "not an OpenSSH public key"),
        (CloudInitConfig(users=(CloudUser("a", (), "secret"),)), "crypt hash"),
        (CloudInitConfig(users=(CloudUser("Alice"),)), "bad user name"),
        (CloudInitConfig(users=(CloudUser("a"), CloudUser("a"))), "listed twice"),
        (CloudInitConfig(hostname="-x"), "bad hostname"),
        (CloudInitConfig(ipconfig=(IpConfig(1),)), "the VM has 1 NIC"),
        (CloudInitConfig(ipconfig=(IpConfig(0, False, "10.0.0.300/24"),)), "bad static"),
        (CloudInitConfig(nameservers=("dns.example",)), "bad nameserver"),
        (CloudInitConfig(network_config="x", ipconfig=(IpConfig(0),)), "not both"),
        (CloudInitConfig(user_data="x" * 70000), "limited to"),
    ],
)
def test_bad_settings_are_refused(config: CloudInitConfig, message: str) -> None:
    with pytest.raises(CloudInitError, match=message):
        validate(config, 1)


def test_ipconfig_syntax() -> None:
    with pytest.raises(CloudInitError, match="use dhcp or ip=CIDR"):
        parse_ipconfig("address=10.0.0.1/24")
    with pytest.raises(CloudInitError, match="ip=CIDR is missing"):
        parse_ipconfig("gw=10.0.0.1")
