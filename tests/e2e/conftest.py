"""Fixtures for the web UI's end-to-end tests: one daemon, one browser, one
logged-in page and one VM (made through the wizard) per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.browser import VIEWPORT, launch, login
from tests.functional.hive import Hive


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(browser: Browser, hive: Hive) -> Iterator[Page]:
    """A logged-in page; the tests navigate it by hash routes."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    login(page, hive)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach the daemon's log and save a screenshot of the page."""
    report = yield
    if report.failed and call.when == "call" and hasattr(item, "funcargs"):
        h = item.funcargs.get("hive")
        if isinstance(h, Hive):
            report.sections.append(("daemon log", h.daemon_log()[-5000:]))
        page = item.funcargs.get("page")
        if page is not None:
            path = Path("/tmp") / f"vh-e2e-{item.name}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                report.sections.append(("screenshot", str(path)))
            except Exception as exc:  # the page may be gone; the report matters more
                report.sections.append(("screenshot", f"none: {exc}"))
    return report
