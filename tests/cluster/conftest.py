"""A cluster on one machine: three `vmhive serve` nodes, each in a network
namespace of its own, joined by a bridge in a fourth ("the switch"), sharing
one throwaway PostgreSQL database (reached over its unix socket, which
namespaces do not hide) and the tiny image directory.

Nothing is created outside the `vhtest-*` namespaces; they go, with every
process in them, when the module ends.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.hive import Hive
from tests.network.helpers import Netns, random_token
from tests.pg import PgServer

SUBNET = "10.77.0"
NODES = ("n1", "n2", "n3")
PORT = 8006


@dataclass
class Node:
    name: str
    ns: Netns
    hive: Hive

    @property
    def address(self) -> str:
        return f"{SUBNET}.{NODES.index(self.name) + 1}:{PORT}"


@dataclass
class Cluster:
    switch: Netns
    nodes: dict[str, Node]
    db_url: str

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def admin_password(self) -> str:
        """The first node to start made `admin` and printed its password."""
        for node in self.nodes.values():
            match = re.search(r"login: admin / (\S+)", node.hive.daemon_log())
            if match:
                return match.group(1)
        raise AssertionError("no node printed the admin password")


def _wire(switch: Netns, ns: Netns, index: int) -> None:
    """A veth from the node's namespace to the switch's bridge, with 10.77.0.N/24."""
    outer, inner = f"vhc{index}-{ns.name[-6:]}", "eth0"
    switch.run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    switch.run("ip", "link", "set", inner, "netns", ns.name)
    switch.run("ip", "link", "set", outer, "master", "br0", "up")
    ns.run("ip", "addr", "add", f"{SUBNET}.{index}/24", "dev", inner)
    ns.run("ip", "link", "set", inner, "up")


@pytest.fixture(scope="module")
def cluster(postgres_server: PgServer, tiny_image_dir: Path) -> Iterator[Cluster]:
    token = random_token()
    spaces: list[Netns] = []
    hives: list[Hive] = []
    database = postgres_server.unique_name("cluster")
    url = postgres_server.create_database(database)
    try:
        switch = Netns(f"vhtest-sw-{token}")
        spaces.append(switch)
        switch.run("ip", "link", "add", "br0", "type", "bridge")
        switch.run("ip", "link", "set", "br0", "up")
        nodes: dict[str, Node] = {}
        for index, name in enumerate(NODES, start=1):
            ns = Netns(f"vhtest-{name}-{token}")
            spaces.append(ns)
            _wire(switch, ns, index)
            hive = Hive(
                tiny_image_dir,
                "--db", url,
                "--node-name", name,
                "--listen", f"{SUBNET}.{index}:{PORT}",
                "--no-default-network",
                netns=ns.name,
            )  # fmt: skip
            hives.append(hive)
            hive.start()
            nodes[name] = Node(name, ns, hive)
        yield Cluster(switch, nodes, url)
    finally:
        for hive in hives:
            with contextlib.suppress(Exception):
                hive.close()
        for ns in reversed(spaces):
            ns.close()
        postgres_server.drop_database(database)
