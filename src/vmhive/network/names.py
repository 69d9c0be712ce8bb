"""Names of the host devices vmhive creates.

Every device vmhive owns starts with ``vh-`` and a letter saying what it is, so
an inventory of the host can tell them apart from everything else:

* ``vh-b<key>``: the bridge of a network (``key`` from the network's name);
* ``vh-t<hex>``: the TAP device of one VM NIC;
* ``vh-d<key>``: the host end of the veth that links a private network's
  bridge to the namespace its DHCP server runs in.

Linux limits interface names to 15 bytes (IFNAMSIZ 16 with the NUL).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from vmhive.network.errors import NetworkConfigError

PREFIX: Final = "vh-"
BRIDGE_PREFIX: Final = "vh-b"
TAP_PREFIX: Final = "vh-t"
DHCP_VETH_PREFIX: Final = "vh-d"
#: The longest interface name Linux accepts.
MAX_IFNAME: Final = 15

# Interface names also end up in nftables rules, sysctl paths and dnsmasq
# configuration: allow only characters that need no quoting anywhere.
_IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NETWORK_NAME_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_KEY_LEN: Final = MAX_IFNAME - len(BRIDGE_PREFIX)


def check_ifname(name: str, what: str = "interface name") -> str:
    """Return `name` if it is a usable interface name, else raise `NetworkConfigError`."""
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise NetworkConfigError(
            f"{what} {name!r} is invalid: use 1-{MAX_IFNAME} letters, digits, '_', '.' or '-'"
        )
    return name


def check_network_name(name: str) -> str:
    if not isinstance(name, str) or not NETWORK_NAME_RE.fullmatch(name):
        raise NetworkConfigError(
            f"network name {name!r} is invalid: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def bridge_name(network_name: str) -> str:
    """The bridge of the network called `network_name`.

    Short names are used as they are; longer ones keep their first six
    characters and get five hex digits of a hash, to stay within 15 bytes:

    >>> bridge_name("default")
    'vh-bdefault'
    >>> bridge_name("lab-network-frontend")
    'vh-blab-ne2f4e7'
    """
    check_network_name(network_name)
    if len(network_name) <= _KEY_LEN:
        return BRIDGE_PREFIX + network_name
    return BRIDGE_PREFIX + network_name[:6] + _digest(network_name, _KEY_LEN - 6)


def tap_name(vm_uuid: str, nic_index: int) -> str:
    """The TAP device of NIC number `nic_index` of the VM `vm_uuid` (stable across restarts).

    >>> tap_name("6f1c2a3e-0b7d-4c5e-9a1f-000000000002", 0)
    'vh-t52a9d76709f'
    """
    if not isinstance(nic_index, int) or nic_index < 0:
        raise NetworkConfigError(f"NIC index must be a non-negative integer, got {nic_index!r}")
    return TAP_PREFIX + _digest(f"{vm_uuid}/{nic_index}", MAX_IFNAME - len(TAP_PREFIX))


def dhcp_veth_name(bridge: str) -> str:
    """The host end of the veth feeding the DHCP server of a private network's `bridge`.

    >>> dhcp_veth_name("vh-blab")
    'vh-dlab'
    """
    if not bridge.startswith(BRIDGE_PREFIX):
        raise NetworkConfigError(f"bridge {bridge!r} is not a vmhive bridge")
    return DHCP_VETH_PREFIX + bridge[len(BRIDGE_PREFIX) :]


def is_vmhive_ifname(name: str) -> bool:
    return name.startswith(PREFIX)
