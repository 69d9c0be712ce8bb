"""The networks page and network cards from the web UI, against a daemon inside
a network namespace of its own (its bridges, nftables and dnsmasq never touch
the host); chromium runs in the same namespace to reach the daemon."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Dialog, Page, expect, sync_playwright

from tests.e2e.browser import VIEWPORT, base_url, launch, login
from tests.e2e.screenshots import kill_dnsmasq, netns_chromium
from tests.functional.hive import Hive
from tests.network.helpers import Netns, random_token
from vmhive.config import Settings

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.functional,
    pytest.mark.network,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@pytest.fixture(scope="module")
def hive_and_page(tiny_image_dir: Path) -> Iterator[tuple[Hive, Page]]:
    with contextlib.ExitStack() as stack:
        netns = Netns(f"vhtest-ui-{random_token()}")
        stack.callback(netns.close)
        hive = Hive(tiny_image_dir, netns=netns.name)
        stack.callback(hive.close)
        stack.callback(kill_dnsmasq, Settings(data_dir=hive.data_dir).net_run_dir)
        hive.start()
        playwright = stack.enter_context(sync_playwright())
        browser = launch(playwright, netns_chromium(netns, stack))
        stack.callback(browser.close)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.set_default_timeout(30_000)

        def accept(dialog: Dialog) -> None:
            dialog.accept()

        page.on("dialog", accept)
        login(page, hive)
        yield hive, page


def test_networks_and_forwards(hive_and_page: tuple[Hive, Page]) -> None:
    hive, page = hive_and_page
    hive.create_tiny("n1", 2)
    page.goto(f"{base_url(hive)}/#/networks")
    nets = page.get_by_test_id("networks")
    expect(nets.locator('tr[data-name="default"]')).to_contain_text("nat")
    page.get_by_test_id("net-name").fill("lab")
    page.get_by_test_id("net-type").select_option("internal")
    page.get_by_role("button", name="Create network").click()
    expect(nets.locator('tr[data-name="lab"]')).to_contain_text("internal")
    assert "lab" in [n["name"] for n in hive.api("GET", "/api/networks").json()]

    form = page.get_by_test_id("new-forward")
    form.locator('[name="host_port"]').fill("8080")
    form.locator('[name="vm"]').select_option("n1")
    form.locator('[name="vm_port"]').fill("80")
    form.get_by_role("button", name="Add forward").click()
    row = page.locator('[data-testid="forwards"] tr[data-port="8080"]')
    expect(row).to_contain_text("n1")
    [forward] = hive.api("GET", "/api/networks/default/forwards").json()
    assert (forward["host_port"], forward["vm"], forward["vm_port"]) == (8080, "n1", 80)
    row.get_by_role("button", name="Remove").click()
    expect(row).to_have_count(0)
    assert hive.api("GET", "/api/networks/default/forwards").json() == []

    nets.locator('tr[data-name="lab"]').get_by_role("button", name="Delete").click()
    expect(nets.locator('tr[data-name="lab"]')).to_have_count(0)


def test_network_cards(hive_and_page: tuple[Hive, Page]) -> None:
    hive, page = hive_and_page
    hive.cli("network", "create", "lab2", "--type", "internal")
    hive.create_tiny("n2", 2)
    page.goto(f"{base_url(hive)}/#/vms/n2/hardware")
    page.locator('#add-nic select[name="network"]').select_option("lab2")
    page.get_by_role("button", name="Add network card").click()
    nic = page.locator('[data-testid="nics"] tr[data-nic="1"]')
    expect(nic).to_contain_text("lab2")
    nic.get_by_role("button", name="Unplug cable").click()
    expect(nic).to_contain_text("down")
    assert hive.vm("n2")["nics"][1]["link_up"] is False
    nic.get_by_role("button", name="Remove").click()
    expect(nic).to_have_count(0)
    assert [n["network"] for n in hive.vm("n2")["nics"]] == ["default"]
