"""The image store (show, import, delete) and imports by URL for volumes, ISOs and images.

URLs are served by a real HTTP server on 127.0.0.1 in the test process.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.hive import Hive
from tests.functional.test_storage import make_iso

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def hive(tiny_image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    """A daemon whose image store is its own (these tests add and delete images),
    holding links to the shared tiny image."""
    store = tmp_path_factory.mktemp("images")
    for path in tiny_image_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            (store / path.name).symlink_to(path)
    h = Hive(store)
    h.start()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def qemu_info(path: str) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def foreign_disk(directory: Path, fmt: str, name: str) -> tuple[Path, Path]:
    raw = directory / f"{name}.raw"
    data = b"vmhive url import\n" * 40000
    raw.write_bytes(data + b"\0" * (2 * 1024 * 1024 - len(data)))
    disk = directory / f"{name}.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(disk)], check=True)
    return raw, disk


def test_volume_iso_and_image_imports_from_urls(
    hive: Hive, web: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = web
    raw, _ = foreign_disk(root, "vmdk", "appliance")
    job = hive.cli("volume", "import", f"{base}/appliance.vmdk", "-o", "json").json()
    assert job["state"] == "succeeded" and job["result"]["volume"] == "appliance"
    volume = hive.cli("volume", "show", "appliance", "-o", "json").json()
    assert volume["virtual_size"] == raw.stat().st_size
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", str(raw), volume["path"]])
    assert same.returncode == 0

    iso = make_iso(tmp_path, "TOOLS", {"a.txt": "a\n"})
    (root / "tools.iso").write_bytes(iso.read_bytes())
    hive.cli("iso", "import", f"{base}/tools.iso")
    assert [i["name"] for i in hive.cli("iso", "list", "-o", "json").json()] == ["tools.iso"]

    foreign_disk(root, "qcow2", "base-os")
    hive.cli("image", "import", f"{base}/base-os.qcow2", "--name", "url-os")
    image = hive.cli("image", "show", "url-os", "-o", "json").json()
    assert image["origin"] == "imported" and image["source"] == f"{base}/base-os.qcow2"
    assert image["sha256"] == hashlib.sha256(Path(image["path"]).read_bytes()).hexdigest()
    hive.cli("image", "delete", "url-os")
    hive.cli("volume", "delete", "appliance")
    hive.cli("iso", "delete", "tools.iso")


def test_bad_and_hostile_urls_leave_nothing_behind(hive: Hive, web: tuple[Path, str]) -> None:
    root, base = web
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow",
         str(root / "evil.qcow2"), "1M"],
        check=True,
    )  # fmt: skip
    (root / "fake.iso").write_bytes(b"\0" * 50000)
    before = hive.cli("volume", "list", "-o", "json").json()
    for args, message in [
        (("volume", "import", f"{base}/evil.qcow2"), "backing file"),
        (("volume", "import", f"{base}/missing.vmdk", "--name", "gone"), "HTTP 404"),
        (("image", "import", f"{base}/evil.qcow2"), "backing file"),
        (("iso", "import", f"{base}/fake.iso"), "not an ISO 9660 image"),
        (("volume", "import", "ftp://127.0.0.1/x.img"), "outside the allowed directories"),
        (("image", "import", "http://user:pw@127.0.0.1/x.img"), "credentials in URLs"),
    ]:
        result = hive.cli(*args, check=False)
        assert result.rc == 1 and message in result.err, (args, result.err)
    assert hive.cli("volume", "list", "-o", "json").json() == before
    assert "evil" not in [i["name"] for i in hive.cli("image", "list", "-o", "json").json()]
    assert hive.cli("iso", "list", "-o", "json").json() == []
    assert not list((hive.data_dir / "import").glob(".download-*"))
    assert not list((hive.data_dir / "iso").glob(".*"))


def test_image_show_import_create_and_delete(hive: Hive) -> None:
    tiny = hive.cli("image", "show", "tiny", "-o", "json").json()
    assert tiny["origin"] == "tiny" and tiny["format"] == "qcow2"
    assert tiny["sha256"] == hashlib.sha256(Path(tiny["path"]).read_bytes()).hexdigest()

    imports = hive.data_dir / "import"
    imports.mkdir(exist_ok=True)
    _, disk = foreign_disk(imports, "vhdx", "legacy")
    hive.cli("image", "import", str(disk))
    image = hive.cli("image", "show", "legacy", "-o", "json").json()
    assert image["origin"] == "imported" and image["source"] == str(disk)
    listed = {i["name"]: i for i in hive.cli("image", "list", "-o", "json").json()}
    assert listed["legacy"]["sha256"] == image["sha256"]
    assert "initrd" not in listed, "the tiny image's initrd is not a disk image"
    dup = hive.cli("image", "import", str(disk), check=False)
    assert dup.rc == 1 and "already exists" in dup.err

    hive.cli("vm", "create", "fromimg", "--image", "legacy", "--disk-size", "64M", "-g", "1",
             "--memory", "64")  # fmt: skip
    vm_disk = hive.vm("fromimg")["disks"][0]
    assert qemu_info(vm_disk["path"])["virtual-size"] == 64 * 1024 * 1024
    users = hive.cli("image", "show", "legacy", "-o", "json").json()["used_by"]
    assert users == {"overlay": ["fromimg"], "copy": []}
    busy = hive.cli("image", "delete", "legacy", check=False)
    assert busy.rc == 1 and "fromimg" in busy.err
    hive.cli("vm", "delete", "fromimg")
    hive.cli("image", "delete", "legacy")
    assert not Path(image["path"]).exists()
    gone = hive.cli("image", "show", "legacy", check=False)
    assert gone.rc == 1 and "no image named 'legacy'" in gone.err
