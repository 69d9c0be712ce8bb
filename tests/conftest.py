"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.hive import Hive
from tests.pg import PgServer

REPO_ROOT = Path(__file__).resolve().parent.parent


def _image_cache_dir() -> Path:
    return Path(os.environ.get("VMHIVE_IMAGE_CACHE") or REPO_ROOT / ".cache" / "images")


@pytest.fixture(scope="session")
def tiny_image_dir() -> Path:
    """Directory holding the built tiny guest image (tiny.qcow2, vmlinuz, initrd.img).

    Built once per session (and cached across sessions by a stamp) into
    REPO/.cache/images, or into $VMHIVE_IMAGE_CACHE when set. Never write to the
    image directly: boot a qcow2 overlay backed by it.
    """
    from vmhive.guest.tiny import GuestBuildError, build_tiny_image

    dest = _image_cache_dir()
    try:
        build_tiny_image(dest)
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the tiny guest image in {dest}: {exc}", pytrace=False)
    return dest


@pytest.fixture(scope="session")
def debian_image_dir() -> Path:
    """Directory holding the built Debian 12 guest image (debian.qcow2).

    Built once (a few minutes: debootstrap from the Debian mirror, as root) and
    cached by a stamp in the same directory as the tiny image. Never write to
    the image directly: boot a qcow2 overlay backed by it.
    """
    from vmhive.guest.debian import DebianBuildError, build_debian_image

    dest = _image_cache_dir()
    try:
        build_debian_image(dest)
    except DebianBuildError as exc:
        pytest.fail(f"cannot build the Debian guest image in {dest}: {exc}", pytrace=False)
    return dest


@pytest.fixture(scope="session")
def installer_iso(tiny_image_dir: Path) -> Path:
    """The tiny guest's installer ISO, built next to (and cached like) the tiny image."""
    from vmhive.guest.installer import InstallerBuildError, build_installer_iso

    try:
        return build_installer_iso(tiny_image_dir, tiny_image_dir)
    except InstallerBuildError as exc:
        pytest.fail(f"cannot build the installer ISO in {tiny_image_dir}: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def hive(tiny_image_dir: Path) -> Iterator[Hive]:
    """One daemon per test module (functional and e2e tiers); tests use distinct
    VM names. Modules needing another daemon define their own `hive`."""
    h = Hive(tiny_image_dir)
    h.start()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server (unix socket only) for the whole session;
    `postgres_server.new_database()` gives a fresh, empty database's URL."""
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PgServer) -> str:
    """One empty database of the session's server: postgresql+asyncpg://...?host=DIR."""
    return postgres_server.new_database("session")


@pytest.fixture(params=["sqlite", "postgresql"])
def hive_db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Run a test on both stores: None (SQLite in the data dir, the default) and a
    fresh PostgreSQL database of its own, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    server: PgServer = request.getfixturevalue("postgres_server")
    name = server.unique_name("test")
    try:
        yield server.create_database(name)
    finally:
        server.drop_database(name)
