"""The accelerator is chosen by a real probe, cached per host boot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmhive.hypervisor.qemu.accel import choose_accel
from vmhive.hypervisor.qemu.process import host_boot_id

pytestmark = pytest.mark.functional


def test_probe_decides_and_is_cached_per_boot(tiny_image_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    kernel, initrd = tiny_image_dir / "vmlinuz", tiny_image_dir / "initrd.img"
    verdict = choose_accel("auto", cache, kernel, initrd)
    assert verdict.accel in ("kvm", "tcg")
    assert verdict.kvm_usable == (verdict.accel == "kvm")
    if verdict.kvm_usable:
        assert "reached user space" in verdict.reason
    else:
        # On these build machines /dev/kvm exists but cannot run a stock kernel.
        assert "KVM" in verdict.reason or "/dev/kvm" in verdict.reason
    stored = json.loads(cache.read_text())
    assert stored["boot_id"] == host_boot_id() and stored["accel"] == verdict.accel

    again = choose_accel("auto", cache, kernel, initrd)
    assert again.probed_at == verdict.probed_at  # from the cache, not probed again

    stale = {**stored, "boot_id": "another-boot", "accel": "bogus"}
    cache.write_text(json.dumps(stale))
    reprobed = choose_accel("auto", cache, kernel, initrd)
    assert reprobed.accel == verdict.accel and reprobed.probed_at > verdict.probed_at


def test_explicit_choices_override(tmp_path: Path) -> None:
    assert choose_accel("tcg", tmp_path / "a.json", None, None).accel == "tcg"
    forced = choose_accel("kvm", tmp_path / "b.json", None, None)
    assert forced.accel == "kvm" and "requested" in forced.reason
