"""Run a command in a network namespace of its own, fed by an interface the parent moves in.

Usage (by `vmhive.network.dnsmasq`, not by hand)::

    python -m vmhive.network.nsexec --ifname dhcp0 --address 10.77.0.1/24 -- COMMAND...

1. The process unshares a new network namespace and writes ``ready`` on stdout.
2. The parent moves `--ifname` in (a veth end, via ``/proc/PID/ns/net``) and
   writes ``go`` on stdin.
3. The process brings ``lo`` and the interface up with `--address`, then
   execs COMMAND.

The namespace has no name: it lives exactly as long as a process in it. A
private network's dnsmasq (which daemonizes) holds it; when dnsmasq exits, the
kernel tears it down and the veth with it, so nothing is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence
from ipaddress import IPv4Interface
from typing import Final

from pyroute2 import IPRoute

CLONE_NEWNET: Final = 0x40000000


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _configure(ifname: str, address: IPv4Interface) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(f"{ifname} was not moved into the namespace")
        ipr.addr(
            "add", index=found[0], address=str(address.ip), prefixlen=address.network.prefixlen
        )
        ipr.link("set", index=found[0], state="up")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmhive.network.nsexec")
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--address", required=True, type=IPv4Interface)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    try:
        _unshare_net()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            print("nsexec: the parent gave up", file=sys.stderr)
            return 1
        _configure(args.ifname, args.address)
        # Let go of the parent's pipes: the command may outlive everyone.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.execv(args.command[0], args.command)
    except Exception as exc:
        print(f"nsexec: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
