"""The image store: base disk images that VMs are created from.

The store is a directory and its files are the truth: `<name>.qcow2` (or
.raw/.img) beside a hidden sidecar `.<name>.meta.json` holding where the
image came from (origin tiny, debian or imported, and the file or URL) and
its SHA-256. The checksum is computed once, when the image is recorded or
first listed, and again only when the file's size or mtime change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmhive.storage import qemu_img

IMAGE_SUFFIXES = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}
# Files of the built images that live beside them but are not disks.
NOT_IMAGES = frozenset({"initrd.img"})
BUILT_ORIGINS = {"tiny": "tiny", "debian": "debian"}
HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    format: str
    virtual_size: int
    actual_size: int
    origin: str
    source: str
    sha256: str
    created_at: datetime


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, name: str) -> tuple[Path, str] | None:
        for suffix, fmt in IMAGE_SUFFIXES.items():
            candidate = self.root / f"{name}{suffix}"
            if candidate.is_file() and candidate.name not in NOT_IMAGES:
                return candidate, fmt
        return None

    def meta_path(self, name: str) -> Path:
        return self.root / f".{name}.meta.json"

    def _meta(
        self, name: str, path: Path, *, origin: str | None = None, source: str = ""
    ) -> dict[str, Any]:
        """The sidecar, refreshed when missing or stale. Runs in a thread (it may hash)."""
        meta_file = self.meta_path(name)
        try:
            meta: dict[str, Any] = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        stamp = _stamp(path)
        if origin is not None:
            meta = {"origin": origin, "source": source}
        if meta.get("stamp") != stamp or "sha256" not in meta:
            meta.setdefault("origin", BUILT_ORIGINS.get(name, "imported"))
            meta.setdefault("source", "")
            meta["sha256"] = sha256_of(path)
            meta["stamp"] = stamp
            meta.setdefault(
                "created_at", datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
            )
            tmp = meta_file.with_name(meta_file.name + ".tmp")
            try:
                tmp.write_text(json.dumps(meta, indent=1) + "\n")
                tmp.replace(meta_file)
            except OSError:
                pass  # a read-only store still answers, it just hashes again next time
        return meta

    async def get(self, name: str) -> Image | None:
        found = self.path_of(name)
        if found is None:
            return None
        path, fmt = found
        data = await qemu_img.info(path, fmt)
        meta = await asyncio.to_thread(self._meta, name, path)
        return Image(
            name=name,
            path=path,
            format=fmt,
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
            origin=meta["origin"],
            source=meta["source"],
            sha256=meta["sha256"],
            created_at=datetime.fromisoformat(meta["created_at"]),
        )

    async def record(self, name: str, origin: str, source: str = "") -> Image:
        """Write a new image's sidecar (origin, source, checksum)."""
        found = self.path_of(name)
        if found is None:
            raise FileNotFoundError(f"image {name} has no file in {self.root}")
        self.meta_path(name).unlink(missing_ok=True)
        await asyncio.to_thread(self._meta, name, found[0], origin=origin, source=source)
        image = await self.get(name)
        assert image is not None
        return image

    async def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        names = sorted(
            {
                p.stem
                for p in self.root.iterdir()
                if p.suffix in IMAGE_SUFFIXES
                and p.is_file()
                and not p.name.startswith(".")
                and p.name not in NOT_IMAGES
            }
        )
        images = [await self.get(name) for name in names]
        return [i for i in images if i is not None]

    def remove(self, name: str) -> None:
        found = self.path_of(name)
        if found is not None:
            os.unlink(found[0])
        self.meta_path(name).unlink(missing_ok=True)
