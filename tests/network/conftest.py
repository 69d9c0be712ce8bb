"""Fixtures for the network tests: namespaces as hosts and VMs, a run directory for dnsmasq.

Functional tests (marked ``network``) need root, iproute2, nft, dnsmasq and
busybox; everything they create lives in namespaces named ``vhtest-*`` that
are deleted afterwards, with every process in them and every dnsmasq started
under the test's run directory. Each fixture exists per test and per module
(``module_*``), for scenarios whose set-up is worth sharing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.network.helpers import Netns, kill_and_wait, processes_with_arg_prefix, random_token

REQUIRED_TOOLS = ("ip", "nft", "ping", "busybox")
DNSMASQ = "/usr/sbin/dnsmasq"
NetnsFactory = Callable[[str], Netns]


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "network tests need root (network namespaces)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not os.path.exists(DNSMASQ):
        missing.append(DNSMASQ)
    return f"missing: {', '.join(missing)}" if missing else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_requirements()
    if reason is None:
        return
    here = str(Path(__file__).parent)
    for item in items:
        if "network" in item.keywords and str(item.path).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))


@contextmanager
def _namespaces() -> Iterator[NetnsFactory]:
    token = random_token()
    created: list[Netns] = []

    def make(role: str) -> Netns:
        ns = Netns(f"vhtest-{role}-{token}")
        created.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(created):
            ns.close()


@contextmanager
def _run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vhnet-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for pid in processes_with_arg_prefix(f"--conf-file={path}/"):
            kill_and_wait(pid)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[NetnsFactory]:
    """A factory of namespaces: ``netns("host")`` -> a fresh `Netns`, deleted after the test."""
    with _namespaces() as make:
        yield make


@pytest.fixture(scope="module")
def module_netns() -> Iterator[NetnsFactory]:
    with _namespaces() as make:
        yield make


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A world-searchable directory for dnsmasq's files (dnsmasq drops to an unprivileged user).

    Any dnsmasq still running from it at the end is killed, including those that
    live in a namespace of their own (private networks).
    """
    with _run_dir() as path:
        yield path


@pytest.fixture(scope="module")
def module_run_dir() -> Iterator[Path]:
    with _run_dir() as path:
        yield path
