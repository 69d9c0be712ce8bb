"""Driving the web UI in Debian's chromium: shared by the e2e tests, the
screenshots script and bench/ui_list.py.

Playwright never downloads a browser here: it launches /usr/bin/chromium
(installed by scripts/install-deps.sh) with the flags this kind of machine needs.
"""

from __future__ import annotations

import re

from playwright.sync_api import Browser, Page, Playwright, ViewportSize

from tests.functional.hive import Hive

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}


def launch(playwright: Playwright, executable: str = CHROMIUM) -> Browser:
    return playwright.chromium.launch(
        executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000
    )


def admin_password(hive: Hive) -> str:
    """The initial admin password, printed once by the daemon's first start."""
    found = re.search(r"login: admin / (\S+)", hive.daemon_log())
    if found is None:
        raise AssertionError(f"no admin password in the daemon's output:\n{hive.daemon_log()}")
    return found.group(1)


def base_url(hive: Hive) -> str:
    return f"http://127.0.0.1:{hive.port}"


def login(page: Page, hive: Hive, password: str | None = None) -> None:
    """Log in through the login form, as a user would."""
    page.goto(base_url(hive) + "/")
    page.get_by_test_id("login-user").fill("admin")
    page.get_by_test_id("login-password").fill(password or admin_password(hive))
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id("logout").wait_for(state="visible", timeout=10_000)


# For page.wait_for_function(CANVAS_HAS_CONTENT, arg=[selector, min_pixels]): true
# once at least min_pixels pixels of the canvas differ from its top-left pixel
# (the background), read back from its 2D context.
CANVAS_HAS_CONTENT = """([selector, minPixels]) => {
  const canvas = document.querySelector(selector);
  if (!canvas || !canvas.width || !canvas.height) return false;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let differing = 0;
  for (let i = 4; i < data.length; i += 4) {
    if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) {
      if (++differing >= minPixels) return true;
    }
  }
  return false;
}"""
