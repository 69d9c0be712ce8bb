"""The ISO library and the VMs' CD-ROM drives."""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmhive.hypervisor.base import DriverError
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.storage import fetch
from vmhive.store.models import Cdrom, Vm

ISO9660_MAGIC = b"CD001"
ISO_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
COPY_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class IsoInfo:
    name: str
    path: Path
    size: int
    used_by: list[str]


def looks_like_iso(path: Path) -> bool:
    """ISO 9660 has 'CD001' at byte 32769 (the primary volume descriptor)."""
    try:
        with path.open("rb") as f:
            f.seek(32769)
            return f.read(5) == ISO9660_MAGIC
    except OSError:
        return False


class MediaService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    @property
    def library(self) -> Path:
        return self.ctx.settings.data_dir / "iso"

    def path_of(self, name_or_path: str) -> Path:
        """An ISO given by its library name, or by a path under the allowed roots."""
        candidate = self.library / name_or_path
        if "/" not in name_or_path and candidate.is_file():
            return candidate
        return specs.check_path_under(name_or_path, [self.library, self.ctx.settings.images], "ISO")

    async def list(self) -> list[IsoInfo]:
        self.library.mkdir(parents=True, exist_ok=True)
        async with self.ctx.sessions() as session:
            rows = (await session.execute(select(Cdrom.iso, Vm.name).join(Vm))).all()
        users: dict[str, list[str]] = {}
        for iso, vm_name in rows:
            if iso:
                users.setdefault(iso, []).append(vm_name)
        return [
            IsoInfo(p.name, p, p.stat().st_size, sorted(users.get(str(p), [])))
            for p in sorted(self.library.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]

    async def import_file(self, source: str, name: str | None = None) -> str:
        """Copy a file on the daemon's host, or download a URL, into the library.

        Any file the daemon can read, but only if it is really an ISO 9660
        image: a guest must not be handed arbitrary host files this way. A
        download is checked the same way before it joins the library.
        """
        url = fetch.is_url(source)
        if url:
            try:
                default = fetch.check_url(source)
            except fetch.FetchError as exc:
                raise InvalidRequest(str(exc)) from None
            src = None
        else:
            src = Path(source).resolve()
            if not src.is_file():
                raise InvalidRequest(f"{source} is not a file on the daemon's host")
            if not looks_like_iso(src):
                raise InvalidRequest(f"{source} is not an ISO 9660 image")
            default = src.name
        target_name = name or default
        if not ISO_NAME_RE.fullmatch(target_name):
            raise InvalidRequest(
                f"invalid ISO name {target_name!r}: letters, digits, '.', '_', '+' and '-'"
                + (" (give one with --name)" if not name else "")
            )
        self.library.mkdir(parents=True, exist_ok=True)
        dest = self.library / target_name
        if dest.exists():
            raise Conflict(f"the ISO library already has {target_name!r}")
        partial = self.library / f".{target_name}.partial"

        async def job(ctx: JobContext) -> dict[str, Any]:
            async def remove_partial() -> None:
                partial.unlink(missing_ok=True)

            ctx.on_rollback("remove the partial copy", remove_partial)
            if src is None:
                await ctx.log(f"downloading {source}")
                try:
                    total = await fetch.download(source, partial, progress=ctx.progress)
                except fetch.FetchError as exc:
                    raise JobError(str(exc)) from exc
                if not looks_like_iso(partial):
                    raise JobError(f"{source} is not an ISO 9660 image")
            else:
                total = src.stat().st_size
                await ctx.log(f"copying {src} ({total} bytes) into the ISO library")
                await asyncio.to_thread(self._copy, src, partial)
            await ctx.progress(95)
            if dest.exists():
                raise JobError(f"the ISO library already has {target_name!r}")
            partial.replace(dest)
            return {"iso": target_name, "path": str(dest), "size": total}

        return await self.ctx.runner.submit(
            "iso.import", f"iso:{target_name}", job, params={"name": target_name}, cancellable=True
        )

    @staticmethod
    def _copy(src: Path, dest: Path) -> None:
        with src.open("rb") as fin, dest.open("wb") as fout:
            shutil.copyfileobj(fin, fout, COPY_CHUNK)

    async def delete(self, name: str) -> None:
        path = self.library / name
        if not ISO_NAME_RE.fullmatch(name) or not path.is_file():
            raise NotFound(f"no ISO named {name!r} in the library")
        users = next((i.used_by for i in await self.list() if i.path == path), [])
        if users:
            raise Conflict(f"ISO {name} is in the CD-ROM drive of VM {', '.join(users)}")
        path.unlink()

    # -- CD-ROM drives ----------------------------------------------------------------

    async def insert(self, vm_name: str, iso: str, drive: int = 0) -> str:
        path = specs.resolve_iso(self.ctx.settings, iso)
        if not looks_like_iso(path):
            raise InvalidRequest(f"{iso} is not an ISO 9660 image")
        return await self._change(vm_name, drive, path)

    async def eject(self, vm_name: str, drive: int = 0) -> str:
        return await self._change(vm_name, drive, None)

    async def _change(self, vm_name: str, drive: int, iso: Path | None) -> str:
        vm = await self.ctx.load_vm(vm_name)
        if not any(c.index == drive for c in vm.cdroms):
            raise NotFound(f"VM {vm_name} has no CD-ROM drive {drive}")
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.ctx.driver.is_running(vm_uuid):
                try:
                    if iso is None:
                        await self.ctx.driver.eject_media(vm_uuid, drive)
                    else:
                        await self.ctx.driver.insert_media(vm_uuid, drive, iso)
                except DriverError as exc:
                    raise JobError(str(exc)) from exc
            async with self.ctx.sessions() as session:
                row = await session.scalar(
                    select(Cdrom).join(Vm).where(Vm.uuid == vm_uuid, Cdrom.index == drive)
                )
                if row is not None:
                    row.iso = str(iso) if iso else None
                await session.commit()
            await ctx.log(f"cdrom{drive}: " + (f"inserted {iso}" if iso else "ejected"))
            return {"vm": vm_name, "drive": drive, "iso": str(iso) if iso else None}

        kind = "vm.cdrom-eject" if iso is None else "vm.cdrom-insert"
        return await self.ctx.runner.submit(kind, f"vm:{vm_uuid}", job, params={"name": vm_name})
