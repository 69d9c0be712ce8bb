"""The image store: base disk images that VMs are created from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmhive.storage import qemu_img

IMAGE_SUFFIXES = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    format: str
    virtual_size: int
    actual_size: int


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, name: str) -> tuple[Path, str] | None:
        for suffix, fmt in IMAGE_SUFFIXES.items():
            candidate = self.root / f"{name}{suffix}"
            if candidate.is_file():
                return candidate, fmt
        return None

    async def get(self, name: str) -> Image | None:
        found = self.path_of(name)
        if found is None:
            return None
        path, fmt = found
        data = await qemu_img.info(path, fmt)
        return Image(
            name=name,
            path=path,
            format=fmt,
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
        )

    async def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        names = sorted(
            {p.stem for p in self.root.iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file()}
        )
        images = [await self.get(name) for name in names]
        return [i for i in images if i is not None]
