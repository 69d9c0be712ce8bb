"""The web UI's other pages end to end, on stopped VMs (nothing boots here):
clone from a template through the wizard, CD-ROM insert and eject, job logs,
errors shown with the server's message, delete, and log out."""

from __future__ import annotations

import io
from typing import Any

import pycdlib
import pytest
from playwright.sync_api import Dialog, Page, expect

from tests.e2e.browser import base_url
from tests.functional.hive import Hive

pytestmark = [pytest.mark.e2e, pytest.mark.functional]


def goto(page: Page, hive: Hive, route: str) -> None:
    page.goto(f"{base_url(hive)}/#{route}")


def api_ok(hive: Hive, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = hive.api(method, path, params={"wait": "true"}, **kwargs)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    assert job["state"] == "succeeded", job
    return job


def small_iso() -> bytes:
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="TOOLS")
    iso.add_fp(io.BytesIO(b"tools\n"), 6, "/README.TXT;1")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def accept_dialogs(page: Page) -> None:
    def accept(dialog: Dialog) -> None:
        dialog.accept()

    page.on("dialog", accept)


def test_wizard_clones_a_template(page: Page, hive: Hive) -> None:
    body = {"name": "base", "memory_mib": 256, "disks": [{"size": "64M"}], "nic": False}
    api_ok(hive, "POST", "/api/vms", json=body)
    api_ok(hive, "POST", "/api/vms/base/template")
    goto(page, hive, "/vms/new")
    page.get_by_test_id("wz-name").fill("from-template")
    page.get_by_test_id("wz-disk-template").check()
    page.get_by_test_id("wz-template").select_option("base")
    page.get_by_test_id("wz-vcpus").fill("2")
    page.get_by_test_id("wz-start").uncheck()
    page.get_by_test_id("wz-create").click()
    expect(page.get_by_test_id("vm-name")).to_have_text("from-template", timeout=60_000)
    vm = hive.vm("from-template")
    assert (vm["vcpus"], vm["state"]) == (2, "stopped")
    assert vm["disks"][0]["source"] != "blank"  # an overlay on the template's disk


def test_wizard_shows_the_servers_message(page: Page, hive: Hive) -> None:
    api_ok(hive, "POST", "/api/vms", json={"name": "taken", "memory_mib": 256, "nic": False})
    goto(page, hive, "/vms/new")
    page.get_by_test_id("wz-name").fill("taken")
    page.get_by_test_id("wz-disk-none").check()
    page.get_by_test_id("wz-start").uncheck()
    page.get_by_test_id("wz-create").click()
    progress = page.get_by_test_id("wz-progress")
    expect(progress).to_contain_text("taken")
    expect(progress).to_contain_text("exists")
    expect(progress).to_have_class("error")


def test_cdrom_insert_and_eject(page: Page, hive: Hive) -> None:
    response = hive.api("PUT", "/api/isos/tools.iso/upload", content=small_iso())
    assert response.status_code == 202, response.text
    hive.api("GET", f"/api/jobs/{response.json()['id']}", params={"wait": "true"})
    body = {"name": "cd", "memory_mib": 256, "cdrom": True, "nic": False}
    api_ok(hive, "POST", "/api/vms", json=body)
    goto(page, hive, "/vms/cd/hardware")
    drive = page.locator('[data-testid="cdroms"] tr[data-drive="0"]')
    expect(drive).to_contain_text("empty")
    drive.get_by_label("ISO for drive 0").select_option("tools.iso")
    drive.get_by_role("button", name="Insert").click()
    expect(drive).to_contain_text("tools.iso", timeout=30_000)
    assert hive.vm("cd")["cdroms"][0]["iso"].endswith("/tools.iso")
    drive.get_by_role("button", name="Eject").click()
    expect(drive).to_contain_text("empty", timeout=30_000)
    assert hive.vm("cd")["cdroms"][0]["iso"] is None


def test_jobs_page_and_job_log(page: Page, hive: Hive) -> None:
    api_ok(hive, "POST", "/api/vms", json={"name": "logged", "memory_mib": 256, "nic": False})
    goto(page, hive, "/jobs")
    row = page.locator('[data-testid="recent-jobs"] [data-testid="job-row"]', has_text="logged")
    expect(row.first).to_contain_text("vm.create")
    expect(row.first).to_contain_text("succeeded")
    row.first.get_by_role("button", name="Show the log").click()
    expect(page.get_by_test_id("job-log")).to_contain_text("vm.create")
    # A job started elsewhere appears without a reload.
    api_ok(hive, "POST", "/api/vms", json={"name": "later", "memory_mib": 256, "nic": False})
    later = page.locator('[data-testid="job-row"]', has_text="later")
    expect(later.first).to_contain_text("succeeded", timeout=20_000)


def test_delete_from_the_summary(page: Page, hive: Hive) -> None:
    api_ok(hive, "POST", "/api/vms", json={"name": "doomed", "memory_mib": 256, "nic": False})
    accept_dialogs(page)
    goto(page, hive, "/vms/doomed")
    page.get_by_test_id("delete-vm").click()
    expect(page.get_by_test_id("vm-table")).to_be_visible(timeout=30_000)
    assert hive.api("GET", "/api/vms/doomed").status_code == 404
    expect(page.locator('tr[data-name="doomed"]')).to_have_count(0)


def test_log_out(page: Page, hive: Hive) -> None:
    goto(page, hive, "/vms")
    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-form")).to_be_visible()
    assert page.request.get(base_url(hive) + "/api/vms").status == 401
    page.reload()
    expect(page.get_by_test_id("login-form")).to_be_visible()
