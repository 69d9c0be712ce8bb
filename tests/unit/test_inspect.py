"""Safe inspection of untrusted disk images (vmhive.storage.inspect).

Every image here is built with the real qemu-img in tmp_path; hostile ones
reproduce the classic qemu-img attacks (backing file /etc/shadow, external
data file, qcow2 header inside a raw disk, vmdk extents on host files, json:
names, absurd sizes, truncated metadata, CPU/memory bombs).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmhive.storage import inspect
from vmhive.storage.inspect import (
    ImageFacts,
    ResourceLimitExceeded,
    ResourceLimits,
    UnsafeImage,
    convert_image,
    detect_format,
    inspect_image,
)

MiB = 1024**2
PiB = 1024**5


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    """Reference facts straight from qemu-img, to compare ours against."""
    import json

    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", fmt, str(path)],
        check=True,
        capture_output=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def same_content(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    return (
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", a_fmt, "-F", b_fmt, str(a), str(b)],
            capture_output=True,
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 MiB raw disk: 1 MiB of a non-repeating pattern, then 1 MiB of zeros."""
    path = tmp_path_factory.mktemp("src") / "source.raw"
    pattern = b"".join(i.to_bytes(4, "little") for i in range(MiB // 4))
    path.write_bytes(pattern + bytes(MiB))
    return path


@pytest.fixture(autouse=True, scope="module")
def host_files_untouched() -> Iterator[None]:
    """The hostile images name real host files; make sure nothing ever wrote to them."""
    paths = [Path("/etc/shadow"), Path("/etc/passwd")]
    before = [(p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    yield
    assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in paths] == before


@pytest.fixture
def no_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prove a refusal happens before qemu-img ever touches the file."""

    async def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"qemu-img must not run: {args}")

    monkeypatch.setattr(inspect, "_run_limited", forbidden)


# (file name, qemu-img -O format, extra convert options)
VARIANTS = [
    ("disk.qcow2", "qcow2", []),
    ("disk.img", "raw", []),
    ("sparse.vmdk", "vmdk", []),
    ("stream.vmdk", "vmdk", ["-o", "subformat=streamOptimized"]),
    ("disk.vhdx", "vhdx", []),
    ("disk.vdi", "vdi", []),
    ("dynamic.vhd", "vpc", []),
    ("fixed.vhd", "vpc", ["-o", "subformat=fixed"]),
]


@pytest.mark.parametrize(("name", "fmt", "opts"), VARIANTS, ids=[v[0] for v in VARIANTS])
async def test_each_format_is_detected_inspected_and_converted(
    tmp_path: Path, source: Path, name: str, fmt: str, opts: list[str]
) -> None:
    image = tmp_path / name
    qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(source), str(image))

    assert detect_format(image) == fmt
    facts = await inspect_image(image)
    reference = qemu_info(image, fmt)
    assert facts == ImageFacts(fmt, reference["virtual-size"], reference["actual-size"])
    # vpc rounds the size up to a CHS geometry; every other format keeps it exactly.
    assert facts.virtual_size == 2 * MiB or (fmt == "vpc" and facts.virtual_size > 2 * MiB)
    assert await inspect_image(image, fmt) == facts

    seen: list[int] = []

    async def progress(percent: int) -> None:
        seen.append(percent)

    dest = tmp_path / "out" / "volume.qcow2"
    dest.parent.mkdir()
    await convert_image(image, facts, dest, progress=progress)
    assert detect_format(dest) == "qcow2"
    assert qemu_info(dest, "qcow2")["virtual-size"] == facts.virtual_size
    assert same_content(source, "raw", dest, "qcow2")
    assert seen and seen[-1] == 100 and seen == sorted(seen)
    assert [p.name for p in dest.parent.iterdir()] == ["volume.qcow2"]  # no temp file left


def test_detect_format_reads_magic_bytes_only(tmp_path: Path) -> None:
    vdi = tmp_path / "a"
    vdi.write_bytes(bytes(0x40) + (0xBEDA107F).to_bytes(4, "little") + bytes(512))
    fixed_vhd = tmp_path / "b"
    fixed_vhd.write_bytes(bytes(4096) + b"conectix" + bytes(504))
    descriptor = tmp_path / "c"
    descriptor.write_text("# Disk DescriptorFile\nversion=1\n")
    qcow_inside = tmp_path / "d"
    qcow_inside.write_bytes(bytes(512) + b"QFI\xfb" + bytes(512))  # not at offset 0
    tiny = tmp_path / "e"
    tiny.write_bytes(b"QF")
    assert [detect_format(p) for p in (vdi, fixed_vhd, descriptor, qcow_inside, tiny)] == [
        "vdi",
        "vpc",
        "vmdk",
        "raw",
        "raw",
    ]


async def test_qcow2_backing_file_is_refused_before_qemu_opens_it(
    tmp_path: Path, no_qemu: None
) -> None:
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", str(bad), "1M")
    for fmt in ("auto", "qcow2"):
        with pytest.raises(UnsafeImage, match=r"backing file \(/etc/shadow\)"):
            await inspect_image(bad, fmt)


async def test_qemu_info_layer_also_refuses_backing_and_data_files(tmp_path: Path) -> None:
    """Defence in depth: qemu's own reading of the image is checked as well."""
    backed = tmp_path / "backed.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", str(backed), "1M"
    )
    with pytest.raises(UnsafeImage, match="backing file"):
        inspect._check_info(
            await inspect._qemu_info(backed, "qcow2"),
            fmt="qcow2",
            path=backed,
            max_virtual_size=PiB,
        )

    external = tmp_path / "external.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={tmp_path / 'data.bin'}",
        str(external),
        "1M",
    )
    with pytest.raises(UnsafeImage, match=r"external file \(.*data\.bin\)"):
        inspect._check_info(
            await inspect._qemu_info(external, "qcow2"),
            fmt="qcow2",
            path=external,
            max_virtual_size=PiB,
        )


def retarget_data_file(image: Path, target: bytes) -> None:
    """Rewrite the qcow2 "external data file name" header extension in place.

    Never create a hostile image with ``qemu-img create -o data_file=/etc/...``:
    qemu-img creates (truncates!) the data file it is given.
    """
    data = bytearray(image.read_bytes())
    header_length = int.from_bytes(data[100:104], "big")
    pos, extensions = header_length, []
    while (magic := int.from_bytes(data[pos : pos + 4], "big")) != 0:
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        body = bytes(data[pos + 8 : pos + 8 + length])
        extensions.append((magic, target if magic == 0x44415441 else body))
        pos += 8 + (length + 7) // 8 * 8
    assert 0x44415441 in [m for m, _ in extensions], "no data file extension"
    out = bytearray()
    for magic, body in extensions:
        out += magic.to_bytes(4, "big") + len(body).to_bytes(4, "big")
        out += body + bytes(-len(body) % 8)
    out += bytes(8)  # end of extensions
    data[header_length : header_length + len(out)] = out
    image.write_bytes(bytes(data))


async def test_qcow2_with_external_data_file_is_refused(tmp_path: Path, no_qemu: None) -> None:
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd'}", str(bad), "1M")
    retarget_data_file(bad, b"/etc/shadow")
    assert b"/etc/shadow" in bad.read_bytes()[:65536]
    with pytest.raises(UnsafeImage, match="keeps its data in an external file"):
        await inspect_image(bad)


async def test_raw_disk_carrying_a_qcow2_header(tmp_path: Path, source: Path) -> None:
    """Auto-detection refuses it; an explicit raw import keeps it as inert bytes."""
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", str(disk), "1M")

    with pytest.raises(UnsafeImage, match="backing file"):
        await inspect_image(disk)

    facts = await inspect_image(disk, "raw")
    assert facts.format == "raw"
    # The file size, rounded up to a whole 512-byte sector as qemu's raw driver does.
    assert facts.virtual_size == -(-disk.stat().st_size // 512) * 512

    dest = tmp_path / "vol.qcow2"
    await convert_image(disk, facts, dest)
    assert same_content(disk, "raw", dest, "qcow2")
    assert "backing-filename" not in qemu_info(dest, "qcow2")


async def test_absurd_virtual_size(tmp_path: Path) -> None:
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(huge), "1P")

    with pytest.raises(UnsafeImage, match=r"1\.0 PiB, more than the 16\.0 TiB limit"):
        await inspect_image(huge)
    with pytest.raises(UnsafeImage, match=r"more than the 16\.0 TiB limit"):
        inspect._check_info(
            await inspect._qemu_info(huge, "qcow2"),
            fmt="qcow2",
            path=huge,
            max_virtual_size=16 * 1024**4,
        )

    facts = await inspect_image(huge, max_virtual_size=2 * PiB)
    assert facts.virtual_size == PiB


async def test_vmdk_descriptor_pointing_at_host_files_is_refused(
    tmp_path: Path, no_qemu: None
) -> None:
    bad = tmp_path / "bad.vmdk"
    bad.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=12345678\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        '# Extent description\nRW 8 FLAT "/etc/passwd" 0\n'
    )
    for fmt in ("auto", "vmdk"):
        with pytest.raises(
            UnsafeImage, match=r"VMDK descriptor that refers to other files \(/etc/passwd\)"
        ):
            await inspect_image(bad, fmt)

    # Without the comment line, auto-detection sees inert text (raw), but an
    # explicit --format vmdk would make qemu parse it, so it is refused too.
    bare = tmp_path / "bare.vmdk"
    bare.write_text('version=1\ncreateType="vmfs"\nRW 8 VMFS "/etc/passwd"\n')
    assert detect_format(bare) == "raw"
    with pytest.raises(UnsafeImage, match="/etc/passwd"):
        await inspect_image(bare, "vmdk")


async def test_multi_file_and_delta_vmdk_are_refused(tmp_path: Path, source: Path) -> None:
    flat = tmp_path / "flat.vmdk"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        str(source),
        str(flat),
    )
    with pytest.raises(UnsafeImage, match=r"flat-flat\.vmdk"):
        await inspect_image(flat)
    with pytest.raises(UnsafeImage, match="'monolithicFlat' VMDK"):
        inspect._check_info(
            await inspect._qemu_info(flat, "vmdk"), fmt="vmdk", path=flat, max_virtual_size=PiB
        )

    base = tmp_path / "base.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(source), str(base))
    delta = tmp_path / "delta.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", str(base), str(delta))
    with pytest.raises(UnsafeImage, match=r"delta disk with a parent \(.*base\.vmdk\)"):
        await inspect_image(delta)
    with pytest.raises(UnsafeImage, match="backing file"):
        inspect._check_info(
            await inspect._qemu_info(delta, "vmdk"), fmt="vmdk", path=delta, max_virtual_size=PiB
        )


async def test_json_file_names_are_refused(tmp_path: Path, no_qemu: None) -> None:
    name = 'json:{"driver":"raw","file":{"driver":"nbd","host":"localhost","port":"10809"}}'
    trap = tmp_path / name
    trap.write_bytes(bytes(512))
    for path in (trap, Path(name)):
        with pytest.raises(UnsafeImage, match="'json:'"):
            await inspect_image(path, "raw")


async def test_broken_qcow2_is_refused(tmp_path: Path, source: Path) -> None:
    good = tmp_path / "good.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(source), str(good))
    data = good.read_bytes()

    short = tmp_path / "short.qcow2"
    short.write_bytes(data[:100])
    with pytest.raises(UnsafeImage, match=r"not a valid qcow2 image \(qcow2 header too short\)\.$"):
        await inspect_image(short)

    # Header intact, clusters missing: info is happy, only `check` notices.
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(data[: 5 * 65536])
    assert qemu_info(truncated, "qcow2")["virtual-size"] == 2 * MiB
    with pytest.raises(
        UnsafeImage, match=r"damaged qcow2 image: qemu-img check found \d+ corruptions"
    ):
        await inspect_image(truncated)

    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + b"\xff" * 4096)
    with pytest.raises(UnsafeImage, match=r"not a valid qcow2 image \(Unsupported qcow2 version"):
        await inspect_image(garbage)


async def test_explicit_format_must_match(tmp_path: Path, source: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(source), str(image))
    with pytest.raises(UnsafeImage, match="not a valid vdi image"):
        await inspect_image(image, "vdi")
    with pytest.raises(UnsafeImage, match="instead of the requested 'raw'"):
        inspect._check_info(qemu_info(image, "qcow2"), fmt="raw", path=image, max_virtual_size=PiB)
    with pytest.raises(ValueError, match="unsupported image format"):
        await inspect_image(image, "qed")


async def test_unsupported_format_is_not_silently_imported_as_raw(tmp_path: Path) -> None:
    qed = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", str(qed), "1M")
    with pytest.raises(UnsafeImage, match=r"looks like a QED image.*--format raw"):
        await inspect_image(qed)
    assert (await inspect_image(qed, "raw")).format == "raw"


async def test_cpu_limit_kills_a_spinning_process() -> None:
    with pytest.raises(ResourceLimitExceeded, match=r"CPU time limit \(1 s\) while spinning"):
        await inspect._run_limited(
            [sys.executable, "-c", "while True: pass"],
            what="spinning",
            limits=ResourceLimits(cpu_seconds=1),
        )


async def test_memory_limit_stops_qemu_img(tmp_path: Path) -> None:
    # Opening a 1 PiB qcow2 needs a 16 MiB L1 table plus caches.
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(huge), "1P")
    with pytest.raises(ResourceLimitExceeded, match=r"memory limit \(48\.0 MiB\)"):
        await inspect._run_limited(
            ["qemu-img", "info", "-f", "qcow2", str(huge)],
            what="inspecting huge.qcow2",
            limits=ResourceLimits(address_space=48 * MiB),
        )


async def test_wall_clock_timeout() -> None:
    with pytest.raises(UnsafeImage, match=r"sleep took longer than 0\.2 s while waiting"):
        await inspect._run_limited(["sleep", "30"], what="waiting", timeout=0.2)


async def test_cancellation_kills_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(
        inspect._run_limited(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], what="waiting")
    )
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


async def test_cancelled_conversion_removes_its_temp_file(tmp_path: Path, source: Path) -> None:
    facts = await inspect_image(source, "raw")
    out = tmp_path / "out"
    out.mkdir()
    started = asyncio.Event()

    async def stuck(percent: int) -> None:
        # qemu-img reports 0% before it creates the target, so wait for more.
        if percent > 0:
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(convert_image(source, facts, out / "vol.qcow2", progress=stuck))
    await asyncio.wait_for(started.wait(), 10)
    assert [p.name for p in out.iterdir() if p.name.endswith(".part")]  # qemu-img is writing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(out.iterdir()) == []


async def test_failed_conversion_removes_its_temp_file(tmp_path: Path, source: Path) -> None:
    facts = await inspect_image(source, "raw")

    async def boom(percent: int) -> None:
        raise RuntimeError("progress sink failed")

    with pytest.raises(RuntimeError, match="progress sink failed"):
        await convert_image(source, facts, tmp_path / "vol.qcow2", progress=boom)
    assert list(tmp_path.iterdir()) == []


async def test_conversion_refuses_an_image_changed_since_inspection(
    tmp_path: Path, source: Path
) -> None:
    facts = await inspect_image(source, "raw")
    stale = ImageFacts("raw", facts.virtual_size // 2, facts.actual_size)
    with pytest.raises(UnsafeImage, match="changed since it was inspected"):
        await convert_image(source, stale, tmp_path / "vol.qcow2")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "taken.qcow2"
    existing.write_bytes(b"")
    with pytest.raises(FileExistsError):
        await convert_image(source, facts, existing)
