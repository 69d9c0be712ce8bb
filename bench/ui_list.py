"""Benchmark: how fast the web UI's VM list paints 500 VMs.

A real daemon (the functional tests' harness) gets 500 stopped VMs without
disks (cheap: a database row and a directory each), created over its unix
socket. Then, for each run, a fresh browser context (Debian's chromium,
headless, logged in by cookie) navigates to /#/vms, and the page's own
performance marks give the time from the start of navigation to

- rendered: the 500 rows are in the DOM (after loading the page, its modules,
  the session check and GET /api/vms), and
- painted: the next frame after that (layout and paint included).

Usage: .venv/bin/python bench/ui_list.py [--vms 500] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright
from tests.e2e.browser import VIEWPORT, base_url, launch, login
from tests.functional.hive import Hive

REPO = Path(__file__).resolve().parent.parent
MARKS = """() => Object.fromEntries(["vm-list-rendered", "vm-list-painted"].map(
  (name) => [name, performance.getEntriesByName(name)[0]?.startTime ?? null]))"""


def create_vms(hive: Hive, count: int) -> float:
    def create(i: int) -> None:
        body = {"name": f"bench-{i:04d}", "memory_mib": 256, "nic": False, "disks": []}
        response = hive.api("POST", "/api/vms", params={"wait": "true"}, json=body)
        assert response.status_code == 200 and response.json()["state"] == "succeeded", (
            response.text
        )

    began = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(create, range(count)))
    return time.perf_counter() - began


def measure(hive: Hive, count: int, runs: int) -> list[tuple[float, float]]:
    results = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        context = browser.new_context(viewport=VIEWPORT)
        login(context.new_page(), hive)
        state = context.storage_state()
        context.close()
        for _ in range(runs + 1):  # the first run warms chromium up and is dropped
            context = browser.new_context(viewport=VIEWPORT, storage_state=state)
            page = context.new_page()
            page.goto(base_url(hive) + "/#/vms")
            page.wait_for_function(
                "(n) => document.querySelectorAll('[data-testid=vm-row]').length === n"
                " && performance.getEntriesByName('vm-list-painted').length > 0",
                arg=count,
                timeout=30_000,
            )
            marks = page.evaluate(MARKS)
            results.append((marks["vm-list-rendered"], marks["vm-list-painted"]))
            context.close()
        browser.close()
    return results[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    images = Path(os.environ.get("VMHIVE_IMAGE_CACHE") or REPO / ".cache" / "images")
    hive = Hive(images)
    try:
        hive.start()
        took = create_vms(hive, args.vms)
        print(f"created {args.vms} VMs in {took:.1f} s")
        results = measure(hive, args.vms, args.runs)
    finally:
        hive.close()
    rendered = [r for r, _ in results]
    painted = [p for _, p in results]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"VM list with {args.vms} VMs, {args.runs} runs (load average {load}), ms from navigation start:"
    )
    print(
        f"  rendered: median {statistics.median(rendered):.0f}  min {min(rendered):.0f}  max {max(rendered):.0f}"
    )
    print(
        f"  painted:  median {statistics.median(painted):.0f}  min {min(painted):.0f}  max {max(painted):.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
