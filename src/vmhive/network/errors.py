"""The errors of the host network library.

Every message is one line that names the object and says what went wrong, so a
job log or an API answer can show it as is.
"""

from __future__ import annotations


class NetworkError(Exception):
    """A host network operation failed (the base of every error raised here)."""


class NetworkConfigError(NetworkError):
    """A network, port forward, reservation or name is invalid as given."""


class SubnetConflictError(NetworkConfigError):
    """A subnet overlaps a host route or address, or another network."""


class NoFreeSubnetError(NetworkError):
    """No candidate subnet is free on this host."""


class LinkError(NetworkError):
    """A netlink operation on a bridge, TAP or veth device failed."""


class LinkConflictError(LinkError):
    """A device exists under the name vmhive wants, but is not the expected kind or owner."""


class FirewallError(NetworkError):
    """The nftables ruleset could not be applied or removed."""


class DnsmasqError(NetworkError):
    """A dnsmasq instance could not be started, found, reloaded or stopped."""
