"""Fixtures for functional tests: a real daemon with the shared tiny image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.hive import Hive


@pytest.fixture
def own_hive(tiny_image_dir: Path) -> Iterator[Hive]:
    """A daemon of the test's own, for tests that kill or restart it."""
    h = Hive(tiny_image_dir)
    h.start()
    try:
        yield h
    finally:
        h.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach the daemon's log to the report."""
    report = yield
    if report.failed and call.when == "call":
        for name in ("hive", "own_hive"):
            h = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(h, Hive):
                report.sections.append((f"{name} daemon log", h.daemon_log()[-5000:]))
    return report
