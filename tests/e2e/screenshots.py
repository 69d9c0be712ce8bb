"""Regenerate docs/screenshots/*.png: every page of the web UI, against a real
daemon running the tiny guest (`make screenshots`).

    python -m tests.e2e.screenshots docs/screenshots

As root, the daemon runs inside a network namespace of its own (as in
tests/network), so its default nat network, DHCP leases and a port forward
show on the pages without touching the host's networking; chromium runs in the
same namespace to reach it. Elsewhere (or with --no-netns) there is no network.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from tests.e2e.browser import CANVAS_HAS_CONTENT, CHROMIUM, VIEWPORT, base_url, launch, login
from tests.functional.hive import READY, Hive, wait_for
from tests.network.helpers import Netns, kill_and_wait, processes_with_arg_prefix, random_token
from vmhive.config import Settings

REPO = Path(__file__).resolve().parents[2]
VM = "web"
SCREEN_TEXT = "(uname -a; echo; head -12 /proc/meminfo; echo; ls -l /) > /dev/tty0"


def prepare(hive: Hive, networked: bool) -> None:
    """A running VM with snapshots and some history, plus a few others around it."""
    if networked:
        hive.cli("network", "create", "lab", "--type", "internal")
    hive.create_tiny(VM, 2, "--description", "the tiny test guest")
    hive.cli("vm", "start", VM)
    for name, gen in (("build-01", 2), ("legacy-bios", 1), ("db-01", 2)):
        hive.create_tiny(name, gen)
    hive.cli("vm", "template", "db-01")
    hive.wait_ready(VM)
    hive.cli("snapshot", "create", VM, "installed")
    hive.cli("snapshot", "create", VM, "configured")
    hive.cli("vm", "start", "build-01")
    hive.wait_ready("build-01")
    hive.cli("vm", "pause", "build-01")
    # The tiny guest's shell is on the serial port: give its screen something to show.
    hive.run_in_guest(VM, SCREEN_TEXT)
    if networked:
        forward = {"host_port": 2222, "vm": VM, "vm_port": 22}
        assert hive.api("POST", "/api/networks/default/forwards", json=forward).is_success
        wait_for(lambda: hive.vm(VM)["nics"][0]["ip"], 120, f"a DHCP lease for {VM}")


def shoot(page: Page, out: Path, name: str) -> None:
    page.wait_for_timeout(400)  # let the last paint settle
    page.screenshot(path=str(out / f"{name}.png"))
    print(f"  {name}.png", flush=True)


def capture(hive: Hive, out: Path, chromium: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        context.set_default_timeout(30_000)
        page = context.new_page()
        base = base_url(hive)
        page.goto(base + "/")
        page.get_by_test_id("login-user").fill("admin")
        shoot(page, out, "login")
        login(page, hive)

        def visit(route: str, name: str, ready: str) -> None:
            page.goto(f"{base}/#{route}")
            page.locator(ready).first.wait_for(state="visible")
            shoot(page, out, name)

        def charted(route: str, name: str) -> None:
            page.goto(f"{base}/#{route}")
            plot = page.locator('[data-testid="chart-cpu"] .plot')
            expect(plot).not_to_have_attribute("data-points", "0", timeout=60_000)
            shoot(page, out, name)

        charted("/", "dashboard")
        visit("/vms", "vm-list", '[data-testid="vm-row"]')
        visit("/vms/new", "wizard", '[data-testid="wizard"]')
        visit(f"/vms/{VM}", "vm-summary", '[data-testid="vm-summary"]')
        page.goto(f"{base}/#/vms/{VM}/serial")
        expect(page.locator(".xterm-rows")).to_contain_text(READY)
        page.locator('[data-testid="serial-console"]').click()
        page.keyboard.type("uname -a; free -m; ip -4 addr show eth0 2>/dev/null | grep inet\n")
        expect(page.locator(".xterm-rows")).to_contain_text("Mem:")
        shoot(page, out, "vm-serial-console")
        page.goto(f"{base}/#/vms/{VM}/display")
        check = ['[data-testid="vnc-console"] canvas', 1500]
        page.wait_for_function(CANVAS_HAS_CONTENT, arg=check)
        shoot(page, out, "vm-graphical-console")
        visit(f"/vms/{VM}/hardware", "vm-hardware", '[data-testid="disks"]')
        visit(f"/vms/{VM}/snapshots", "vm-snapshots", '[data-testid="snapshot"]')
        charted(f"/vms/{VM}/metrics", "vm-metrics")
        visit(f"/vms/{VM}/tasks", "vm-tasks", '[data-testid="job-row"]')
        visit("/storage", "storage", '[data-testid="images"]')
        visit("/networks", "networks", '[data-testid="networks"]')
        visit("/jobs", "jobs", '[data-testid="job-row"]')
        browser.close()


def netns_chromium(netns: Netns, stack: contextlib.ExitStack) -> str:
    """A chromium executable that runs inside `netns` (Playwright talks to it over a pipe)."""
    folder = Path(tempfile.mkdtemp(prefix="vh-chromium-", dir="/tmp"))
    stack.callback(shutil.rmtree, folder, True)
    wrapper = folder / "chromium"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns.name} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def kill_dnsmasq(run_dir: Path) -> None:
    """A private network's dnsmasq lives in a namespace of its own, outliving ours."""
    for pid in processes_with_arg_prefix(f"--conf-file={run_dir}/"):
        kill_and_wait(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=REPO / "docs" / "screenshots")
    parser.add_argument(
        "--no-netns", dest="netns", action="store_false", help="no namespace, no network"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from vmhive.guest.tiny import build_tiny_image

    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE") or REPO / ".cache" / "images")
    build_tiny_image(images)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        netns = None
        chromium = CHROMIUM
        if args.netns and os.geteuid() == 0:
            netns = Netns(f"vhshot-{random_token()}")
            stack.callback(netns.close)
            chromium = netns_chromium(netns, stack)
        hive = Hive(images, netns=netns.name if netns else None)
        stack.callback(hive.close)
        if netns:
            stack.callback(kill_dnsmasq, Settings(data_dir=hive.data_dir).net_run_dir)
        hive.start()
        prepare(hive, networked=netns is not None)
        capture(hive, args.out, chromium)
    print(f"screenshots in {args.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
