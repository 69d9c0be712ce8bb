"""Pool drivers: where volumes live and how they are made.

The services above talk to `PoolDriver` only, so LVM-thin, NFS or Ceph RBD
pools can be added as new drivers without touching them. Volumes are named
files (or, later, block devices) that QEMU opens by path.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from vmhive.storage import qemu_img


@dataclass(frozen=True)
class Capacity:
    total: int
    free: int


@dataclass(frozen=True)
class VolumeSizes:
    virtual: int
    allocated: int


class PoolError(Exception):
    pass


class PoolDriver(ABC):
    type: str

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def prepare(self) -> None:
        """Make the pool usable (idempotent): create its directory, mount, ..."""

    @abstractmethod
    def capacity(self) -> Capacity: ...

    @abstractmethod
    def volume_path(self, name: str, fmt: str) -> Path: ...

    @abstractmethod
    async def create(self, name: str, size: int, fmt: str = "qcow2") -> Path: ...

    @abstractmethod
    async def resize(self, path: Path, size: int, fmt: str) -> None: ...

    @abstractmethod
    async def sizes(self, path: Path, fmt: str) -> VolumeSizes: ...

    @abstractmethod
    async def delete(self, path: Path) -> None: ...


class DirPool(PoolDriver):
    """A directory of image files (qcow2, thin)."""

    type = "dir"

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def capacity(self) -> Capacity:
        usage = shutil.disk_usage(self.path)
        return Capacity(total=usage.total, free=usage.free)

    def volume_path(self, name: str, fmt: str) -> Path:
        return self.path / f"{name}.{fmt}"

    async def create(self, name: str, size: int, fmt: str = "qcow2") -> Path:
        path = self.volume_path(name, fmt)
        if path.exists():
            raise PoolError(f"{path} already exists")
        await qemu_img.create_blank(path, size, fmt)
        return path

    async def resize(self, path: Path, size: int, fmt: str) -> None:
        await qemu_img.resize(path, size, fmt)

    async def sizes(self, path: Path, fmt: str) -> VolumeSizes:
        data = await qemu_img.info(path, fmt)
        return VolumeSizes(int(data["virtual-size"]), int(data.get("actual-size", 0)))

    async def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)


POOL_TYPES: dict[str, type[PoolDriver]] = {"dir": DirPool}


def driver_for(pool_type: str, path: str) -> PoolDriver:
    try:
        return POOL_TYPES[pool_type](Path(path))
    except KeyError:
        raise PoolError(f"unknown pool type {pool_type!r}") from None
