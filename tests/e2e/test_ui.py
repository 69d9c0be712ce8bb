"""The web UI end to end: Debian's chromium (Playwright) against a real daemon
running the tiny guest under TCG. One daemon and one VM, made through the
wizard, serve the whole module."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pycdlib
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.browser import CANVAS_HAS_CONTENT, VIEWPORT, base_url
from tests.functional.hive import BOOT_DEADLINE, READY, Hive

pytestmark = [pytest.mark.e2e, pytest.mark.functional]

VM = "web1"


def goto(page: Page, hive: Hive, route: str) -> None:
    page.goto(f"{base_url(hive)}/#{route}")


def state_of(page: Page, name: str) -> str:
    return page.locator(f'tr[data-name="{name}"] [data-testid="state"]').inner_text()


@pytest.fixture(scope="module")
def ui_vm(page: Page, hive: Hive) -> str:
    """A gen 2 VM from the tiny image, created and started through the wizard."""
    goto(page, hive, "/vms")
    page.get_by_test_id("new-vm").click()
    page.get_by_test_id("wz-name").fill(VM)
    page.get_by_test_id("wz-memory").fill("256")
    page.get_by_test_id("wz-disk-image").check()
    page.get_by_test_id("wz-image").select_option("tiny")
    expect(page.get_by_test_id("wz-start")).to_be_checked()
    page.get_by_test_id("wz-create").click()
    # On success the wizard opens the VM's page.
    expect(page.get_by_test_id("vm-name")).to_have_text(VM, timeout=120_000)
    hive.wait_ready(VM)
    return VM


def test_wizard_creates_a_running_vm(page: Page, hive: Hive, ui_vm: str) -> None:
    vm = hive.vm(ui_vm)
    assert (vm["generation"], vm["memory_mib"], vm["state"]) == (2, 256, "running")
    assert vm["disks"][0]["image"] == "tiny"
    goto(page, hive, "/vms")
    row = page.locator(f'tr[data-name="{ui_vm}"]')
    expect(row.get_by_test_id("state")).to_have_text("running")
    expect(row.get_by_test_id("action-stop")).to_be_visible()


def test_vm_list_updates_live(page: Page, hive: Hive, ui_vm: str) -> None:
    """A state change made elsewhere (the CLI) shows up without a reload."""
    goto(page, hive, "/vms")
    row = page.locator(f'tr[data-name="{ui_vm}"]')
    expect(row.get_by_test_id("state")).to_have_text("running")
    page.evaluate("window.__marker = 'no reload'")
    hive.cli("vm", "pause", ui_vm)
    expect(row.get_by_test_id("state")).to_have_text("paused", timeout=20_000)
    expect(row.get_by_test_id("action-resume")).to_be_visible()
    # Resume from the UI this time.
    row.get_by_test_id("action-resume").click()
    expect(row.get_by_test_id("state")).to_have_text("running", timeout=20_000)
    assert page.evaluate("window.__marker") == "no reload"
    assert hive.vm(ui_vm)["state"] == "running"


def test_serial_console(page: Page, hive: Hive, ui_vm: str) -> None:
    goto(page, hive, f"/vms/{ui_vm}/serial")
    screen = page.locator('[data-testid="serial-console"] .xterm-rows')
    expect(page.get_by_test_id("console-status")).to_have_attribute("data-state", "ok")
    # The server replays the recent console, so the boot banner is there at once.
    expect(screen).to_contain_text(READY, timeout=BOOT_DEADLINE * 1000)
    page.locator('[data-testid="serial-console"]').click()
    page.keyboard.type("echo hello-$((6*7))\n")
    expect(screen).to_contain_text("hello-42", timeout=30_000)
    # A reload gets a fresh ticket and the screen back.
    page.reload()
    expect(page.get_by_test_id("console-status")).to_have_attribute("data-state", "ok")
    expect(screen).to_contain_text("hello-42", timeout=15_000)


def test_graphical_console(page: Page, hive: Hive, ui_vm: str) -> None:
    # The tiny guest's shell is on the serial port; put text on its screen.
    text = "for i in 1 2 3 4 5 6; do echo vmhive-on-the-screen-$i; done > /dev/tty0"
    with ThreadPoolExecutor(1) as pool:  # its asyncio loop cannot share Playwright's thread
        pool.submit(hive.run_in_guest, ui_vm, text).result(timeout=90)
    goto(page, hive, f"/vms/{ui_vm}/display")
    expect(page.get_by_test_id("console-status")).to_have_attribute("data-state", "ok")
    # Six lines of text are thousands of pixels; the cursor alone is a few dozen.
    check = ['[data-testid="vnc-console"] canvas', 1500]
    page.wait_for_function(CANVAS_HAS_CONTENT, arg=check, timeout=60_000)
    # After a reload (a new ticket), the display comes back.
    page.reload()
    expect(page.get_by_test_id("console-status")).to_have_attribute("data-state", "ok")
    page.wait_for_function(CANVAS_HAS_CONTENT, arg=check, timeout=60_000)


def test_snapshot_from_the_ui(page: Page, hive: Hive, ui_vm: str) -> None:
    goto(page, hive, f"/vms/{ui_vm}/snapshots")
    page.get_by_test_id("snapshot-name").fill("first")
    page.get_by_test_id("snapshot-create").click()
    first = page.locator('[data-testid="snapshot"][data-snapshot="first"]')
    expect(first).to_be_visible(timeout=60_000)
    page.get_by_test_id("snapshot-name").fill("second")
    page.get_by_test_id("snapshot-create").click()
    # The tree: "second" hangs under "first" and is the current one.
    second = first.locator('[data-testid="snapshot"][data-snapshot="second"]')
    expect(second).to_be_visible(timeout=60_000)
    expect(second.locator(".snap").first).to_have_class(re.compile(r"\bcurrent\b"))
    names = [s["name"] for s in hive.cli("snapshot", "list", ui_vm, "--output", "json").json()]
    assert sorted(names) == ["first", "second"]


def test_metrics_chart_has_points(page: Page, hive: Hive, ui_vm: str) -> None:
    goto(page, hive, f"/vms/{ui_vm}/metrics")
    plot = page.locator('[data-testid="chart-cpu"] .plot')
    expect(plot.locator("canvas")).to_be_visible()
    # Samples arrive every few seconds; the tab refreshes every 5 s.
    expect(plot).not_to_have_attribute("data-points", "0", timeout=60_000)
    goto(page, hive, "/")
    host_plot = page.locator('[data-testid="chart-cpu"] .plot')
    expect(host_plot).not_to_have_attribute("data-points", "0", timeout=60_000)
    expect(page.get_by_test_id("vm-counts")).to_contain_text("running")


def test_user_text_is_escaped(page: Page, hive: Hive, ui_vm: str) -> None:
    evil = '<img src=x onerror="window.__xss=1">'
    assert hive.api("PATCH", f"/api/vms/{ui_vm}", json={"description": evil}).status_code == 200
    goto(page, hive, f"/vms/{ui_vm}")
    expect(page.get_by_test_id("vm-summary")).to_contain_text(evil)
    assert page.locator('[data-testid="vm-summary"] img').count() == 0
    assert page.evaluate("window.__xss") is None


def test_wrong_password_is_refused(browser: Browser, hive: Hive) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(base_url(hive) + "/")
        page.get_by_test_id("login-user").fill("admin")
        page.get_by_test_id("login-password").fill("not-the-password")
        page.get_by_test_id("login-submit").click()
        expect(page.get_by_test_id("login-error")).to_have_text("wrong user name or password")
        expect(page.get_by_test_id("logout")).to_be_hidden()
        assert page.request.get(base_url(hive) + "/api/vms").status == 401
    finally:
        context.close()


def test_request_without_csrf_token_is_refused(page: Page, hive: Hive, ui_vm: str) -> None:
    goto(page, hive, "/vms")
    url = f"/api/vms/{ui_vm}/pause"
    status, detail = page.evaluate(
        """async (url) => {
          const r = await fetch(url, {method: "POST"});
          return [r.status, (await r.json()).detail];
        }""",
        url,
    )
    assert (status, detail) == (403, "missing or wrong CSRF token")
    # The cookie alone through Playwright's request API: refused the same way.
    assert page.request.post(base_url(hive) + url).status == 403
    assert hive.vm(ui_vm)["state"] == "running"


def test_upload_an_iso(page: Page, hive: Hive, tmp_path: Path) -> None:
    """Upload (XHR with progress) then the import job, from the storage page."""
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="UPLOADED")
    payload = b"uploaded through the web UI\n" * 40_000
    iso.add_fp(io.BytesIO(payload), len(payload), "/README.TXT;1")
    iso.write(str(tmp_path / "tools.iso"))
    iso.close()
    (tmp_path / "not-an-iso.iso").write_bytes(b"\0" * 70_000)

    goto(page, hive, "/storage")
    local = page.get_by_test_id("pools").locator("tbody tr", has_text="local")
    expect(local).to_contain_text("usable")  # scope and state on this node
    form = page.get_by_test_id("import-iso")
    form.get_by_test_id("upload-iso-file").set_input_files(str(tmp_path / "not-an-iso.iso"))
    form.get_by_role("button", name="Add ISO").click()
    # Refused by the same checks as an import from the host: the reason is shown.
    expect(form.locator('[data-role="progress-text"]')).to_contain_text("ISO", timeout=30_000)
    expect(page.get_by_test_id("isos")).not_to_contain_text("not-an-iso")

    form.get_by_test_id("upload-iso-file").set_input_files(str(tmp_path / "tools.iso"))
    form.get_by_role("button", name="Add ISO").click()
    expect(form.locator('[data-role="progress-text"]')).to_have_text("done", timeout=60_000)
    expect(page.locator('[data-testid="isos"] tr[data-name="tools.iso"]')).to_be_visible()
    assert "tools.iso" in [i["name"] for i in hive.api("GET", "/api/isos").json()]
