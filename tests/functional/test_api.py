"""The REST API's contract: auth, OpenAPI, jobs, and bad input that changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.functional.hive import Hive

pytestmark = pytest.mark.functional


def snapshot_tree(hive: Hive) -> set[str]:
    """Every file under the VM and run dirs, to prove a refused request changed nothing."""
    found = set()
    for root in (hive.data_dir / "vms", hive.data_dir / "run"):
        for dirpath, _dirs, files in os.walk(root):
            found.update(os.path.join(dirpath, f) for f in files)
    return found


def test_tcp_api_needs_the_token_and_unix_socket_is_private(hive: Hive) -> None:
    url = f"http://127.0.0.1:{hive.port}/api/vms"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {hive.token}"})
    assert ok.status_code == 200 and isinstance(ok.json(), list)
    assert (hive.data_dir / "token").stat().st_mode & 0o777 == 0o600
    assert (hive.data_dir / "api.sock").stat().st_mode & 0o777 == 0o600
    assert hive.cli("token").out.strip() == hive.token
    # The CLI works over TCP too, with --api and the token.
    listed = hive.cli(
        "--api", f"http://127.0.0.1:{hive.port}", "--token", hive.token, "vm", "list", "-o", "json"
    )
    assert listed.json() == ok.json()


def test_openapi_document(hive: Hive) -> None:
    doc = hive.api("GET", "/api/openapi.json").json()
    assert doc["info"]["title"] == "vmhive"
    for path in ("/api/vms", "/api/vms/{name}", "/api/jobs/{job_id}", "/api/host"):
        assert path in doc["paths"], path


def test_create_answers_202_with_a_job_and_wait_blocks(hive: Hive) -> None:
    body = {"name": "jobby", "generation": 1, "memory_mib": 64, "disks": [{"size": "16M"}]}
    accepted = hive.api("POST", "/api/vms", json=body)
    assert accepted.status_code == 202
    job = accepted.json()
    assert job["kind"] == "vm.create" and job["state"] in ("queued", "running", "succeeded")
    assert accepted.headers["location"] == f"/api/jobs/{job['id']}"
    done = hive.api("GET", f"/api/jobs/{job['id']}", params={"wait": "true"}).json()
    assert done["state"] == "succeeded" and done["progress"] == 100
    assert [entry["seq"] for entry in done["log"]] == list(range(1, len(done["log"]) + 1))
    deleted = hive.api("DELETE", "/api/vms/jobby", params={"wait": "true"})
    assert deleted.status_code == 200 and deleted.json()["state"] == "succeeded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "create", "Bad_Name", "--disk-size", "16M"], "invalid VM name"),
        (["vm", "create", "web1.", "--disk-size", "16M"], "invalid VM name"),
        (["vm", "create", "toolong" * 10, "--disk-size", "16M"], "invalid VM name"),
        (["vm", "create", "ok1", "--vcpus", "0"], "vcpus must be"),
        (["vm", "create", "ok1", "--memory", "1"], "memory must be"),
        (["vm", "create", "ok1", "--memory", "99999999"], "memory must be"),
        (
            ["vm", "create", "ok1", "--memory", "128", "-g", "2"],
            "at least 192 MiB for a generation 2",
        ),
        (["vm", "create", "ok1", "--disk-size", "lots"], "not a size"),
        (["vm", "create", "ok1", "--disk-size", "100P"], "not a size"),
        (["vm", "create", "ok1", "--disk-size", "1K"], "disk size must be"),
        (["vm", "create", "ok1", "--image", "nosuchimage"], "unknown image"),
        (["vm", "create", "ok1", "--iso", "/etc/passwd"], "outside the allowed directories"),
        (["vm", "create", "ok1", "--kernel", "/boot/../etc/shadow"], "outside the allowed"),
        (["vm", "create", "ok1", "--generation", "3"], "generation must be 1 or 2"),
        (["vm", "create", "ok1", "--boot-order", "floppy"], "invalid boot order"),
        (["vm", "create", "ok1", "--mac", "01:00:5e:00:00:01"], "invalid MAC"),
        (["vm", "start", "nosuchvm"], "no VM named"),
        (["vm", "delete", "nosuchvm"], "no VM named"),
        (["job", "show", "nosuchjob"], "no job with id"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    hive: Hive, args: list[str], message: str
) -> None:
    before_vms = hive.cli("vm", "list", "-o", "json").json()
    before_files = snapshot_tree(hive)
    result = hive.cli(*args, check=False)
    assert result.rc == 1
    assert message in result.err
    assert result.err.startswith("error: ") and result.err.count("\n") == 1, result.err
    assert hive.cli("vm", "list", "-o", "json").json() == before_vms
    assert snapshot_tree(hive) == before_files


def test_conflicts(hive: Hive) -> None:
    hive.cli("vm", "create", "twin", "--disk-size", "16M", "-g", "1", "--memory", "64")
    files = snapshot_tree(hive)
    dup = hive.cli("vm", "create", "twin", "--disk-size", "16M", check=False)
    assert dup.rc == 1 and "already exists" in dup.err
    assert snapshot_tree(hive) == files
    stopped = hive.cli("vm", "stop", "twin", check=False)
    assert stopped.rc == 1 and "not running" in stopped.err
    hive.cli("vm", "start", "twin")
    again = hive.cli("vm", "start", "twin", check=False)
    assert again.rc == 1 and "already running" in again.err
    running = hive.cli("vm", "delete", "twin", check=False)
    assert running.rc == 1 and "is running" in running.err
    assert hive.vm("twin")["state"] == "running"
    hive.cli("vm", "delete", "twin", "--force")
    assert hive.cli("vm", "list", "-o", "json").json() == [] or all(
        vm["name"] != "twin" for vm in hive.cli("vm", "list", "-o", "json").json()
    )


def test_api_refusals_are_4xx_with_a_message(hive: Hive) -> None:
    bad = hive.api("POST", "/api/vms", json={"name": "x", "memory_mib": "lots"})
    assert bad.status_code == 422 and bad.json()["detail"]
    extra = hive.api("POST", "/api/vms", json={"name": "x", "frobnicate": True})
    assert extra.status_code == 422
    unknown = hive.api("POST", "/api/vms/nosuch/start")
    assert unknown.status_code == 404 and "no VM named" in unknown.json()["detail"]
    action = hive.api("POST", "/api/vms/nosuch/explode")
    assert action.status_code == 404


def test_host_info_reports_accel_and_pinned_machines(hive: Hive) -> None:
    info = hive.cli("host", "info", "--output", "json").json()
    assert info["accel"] == "tcg"  # the fixture asks for --accel tcg
    assert info["machine_types"]["gen1"].startswith("pc-i440fx-")
    assert info["machine_types"]["gen2"].startswith("pc-q35-")
    assert Path(info["firmware"]["ovmf_code"]).exists()


def test_images_listed(hive: Hive) -> None:
    images = hive.cli("image", "list", "--output", "json").json()
    tiny = next(i for i in images if i["name"] == "tiny")
    assert tiny["format"] == "qcow2" and tiny["virtual_size"] > tiny["actual_size"] > 0
    assert tiny["origin"] == "tiny" and len(tiny["sha256"]) == 64


def test_job_commands_wait_and_cancel(hive: Hive) -> None:
    """A queued job can be cancelled; `job wait` follows another to its end."""
    hive.cli("vm", "create", "queue", "-g", "1", "--memory", "64", "--disk-size", "16M", "--start")
    # No OS on the blank disk ignores the power button: the stop runs 10 s, then forces.
    stop = hive.cli("vm", "stop", "queue", "--timeout", "10", "--no-wait", "-o", "json").json()
    pause = hive.cli("vm", "pause", "queue", "--no-wait", "-o", "json").json()
    assert pause["state"] == "queued"
    running = hive.cli("job", "cancel", stop["id"], check=False)
    assert running.rc == 1 and "cannot be cancelled once running" in running.err
    cancelled = hive.cli("job", "cancel", pause["id"], "-o", "json").json()
    assert cancelled["state"] == "cancelled"
    again = hive.cli("job", "cancel", pause["id"], check=False)
    assert again.rc == 1 and "already ended" in again.err
    waited = hive.cli("job", "wait", stop["id"], "-o", "json").json()
    assert waited["state"] == "succeeded"
    assert "forcing off" in " ".join(line["message"] for line in waited["log"])
    assert hive.vm("queue")["state"] == "stopped"
    jobs = hive.cli("job", "list", "-o", "json").json()
    assert {stop["id"], pause["id"]} <= {job["id"] for job in jobs}
    hive.cli("vm", "delete", "queue")


def test_build_tiny_through_the_daemon_reuses_the_cached_image(hive: Hive) -> None:
    image = hive.image_dir / "tiny.qcow2"
    before = image.stat().st_mtime_ns
    result = hive.cli("image", "build", "tiny")
    assert "image tiny ready" in result.out
    assert image.stat().st_mtime_ns == before, "a current image is not rebuilt"


def test_disk_sources_overlay_copy_and_blank(hive: Hive) -> None:
    import json
    import subprocess

    def backing(path: str) -> str | None:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", path], capture_output=True, check=True
        )
        value: str | None = json.loads(out.stdout).get("backing-filename")
        return value

    job = hive.cli(
        "vm",
        "create",
        "copied",
        "-g",
        "1",
        "--memory",
        "64",
        "--image",
        "tiny",
        "--full-copy",
        "-o",
        "json",
    ).json()
    assert job["state"] == "succeeded" and any(
        "full copy" in line["message"] for line in job["log"]
    )
    overlay = hive.create_tiny("layered", 1, "--disk-size", "512M")
    copied = hive.vm("copied")
    assert copied["disks"][0]["source"] == "copy" and backing(copied["disks"][0]["path"]) is None
    assert overlay["disks"][0]["source"] == "overlay"
    assert backing(overlay["disks"][0]["path"]) == str(hive.image_dir / "tiny.qcow2")
    assert overlay["disks"][0]["size_bytes"] == 512 * 1024**2
    too_small = hive.cli(
        "vm", "create", "shrunk", "--image", "tiny", "--disk-size", "16M", check=False
    )
    assert too_small.rc == 1 and "smaller than image" in too_small.err
    hive.cli("vm", "delete", "copied")
    hive.cli("vm", "delete", "layered")


def test_a_failed_start_says_why_and_leaves_the_vm_stopped(hive: Hive) -> None:
    hive.cli("vm", "create", "brokendisk", "-g", "1", "--memory", "64", "--disk-size", "16M")
    vm = hive.vm("brokendisk")
    Path(vm["disks"][0]["path"]).unlink()
    failed = hive.cli("vm", "start", "brokendisk", check=False)
    assert failed.rc == 1 and failed.err.count("\n") == 1
    assert "QEMU did not start" in failed.err and "disk0.qcow2" in failed.err
    vm = hive.vm("brokendisk")
    assert (vm["state"], vm["desired_state"], vm["pid"]) == ("stopped", "stopped", None)
    assert hive.qemu_pids() == []
    hive.cli("vm", "delete", "brokendisk")
