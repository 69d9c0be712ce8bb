"""Bringing foreign disk images in, from a file on the host or a URL.

Both volume and image imports go the same way: a local file is inspected
before the job is accepted; a URL is downloaded inside the job (the first
half of its progress), then inspected exactly like a file. Nothing is
converted before the inspection passed, and the download is always removed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vmhive.config import Settings
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import specs
from vmhive.services.errors import InvalidRequest
from vmhive.storage import fetch, inspect, qemu_img


@dataclass(frozen=True)
class ImportSource:
    text: str  # what the user gave
    path: Path | None  # a local file, inspected already
    facts: inspect.ImageFacts | None
    fmt: str

    @property
    def is_url(self) -> bool:
        return self.path is None

    @property
    def default_name(self) -> str:
        name = fetch.check_url(self.text) if self.is_url else Path(self.text).name
        for suffix in (".qcow2", ".raw", ".img", ".vmdk", ".vhdx", ".vhd", ".vdi", ".gz"):
            name = name.removesuffix(suffix)
        return name


async def check_source(settings: Settings, source: str, fmt: str) -> ImportSource:
    """Refuse bad input before any job starts: unknown format, path outside the
    import roots, an unsafe image, a URL that is not http(s)."""
    if fmt != "auto" and fmt not in inspect.SUPPORTED_FORMATS:
        raise InvalidRequest(
            f"format must be auto or one of {', '.join(inspect.SUPPORTED_FORMATS)}"
        )
    if fetch.is_url(source):
        try:
            fetch.check_url(source)
        except fetch.FetchError as exc:
            raise InvalidRequest(str(exc)) from None
        return ImportSource(source, None, None, fmt)
    roots = [settings.data_dir / "import", settings.images]
    path = specs.check_path_under(source, roots, "import source")
    try:
        facts = await inspect.inspect_image(path, fmt)
    except inspect.UnsafeImage as exc:
        raise InvalidRequest(f"refusing to import {source}: {exc}") from None
    return ImportSource(source, path, facts, fmt)


async def convert_into(
    ctx: JobContext, settings: Settings, source: ImportSource, dest: Path
) -> inspect.ImageFacts:
    """Download (for a URL), inspect and convert into `dest` as qcow2."""
    path, facts = source.path, source.facts
    download: Path | None = None
    convert_base = 0
    try:
        if path is None:
            staging = settings.data_dir / "import"
            staging.mkdir(parents=True, exist_ok=True)
            download = staging / f".download-{uuid.uuid4().hex}"
            await ctx.log(f"downloading {source.text}")
            try:
                size = await fetch.download(source.text, download, progress=_scaled(ctx, 0, 50))
            except fetch.FetchError as exc:
                raise JobError(str(exc)) from exc
            await ctx.log(f"downloaded {size} bytes; inspecting")
            try:
                facts = await inspect.inspect_image(download, source.fmt)
            except inspect.UnsafeImage as exc:
                raise JobError(f"refusing to import {source.text}: {exc}") from exc
            path, convert_base = download, 50
        assert facts is not None
        await ctx.log(
            f"converting {source.text} ({facts.format}, {facts.virtual_size} bytes) to qcow2"
        )
        try:
            await inspect.convert_image(
                path, facts, dest, progress=_scaled(ctx, convert_base, 100 - convert_base)
            )
        except (inspect.UnsafeImage, qemu_img.QemuImgError) as exc:
            raise JobError(str(exc)) from exc
        return facts
    finally:
        if download is not None:
            download.unlink(missing_ok=True)


def _scaled(ctx: JobContext, base: int, span: int) -> Callable[[int], Awaitable[None]]:
    async def report(percent: int) -> None:
        await ctx.progress(base + percent * span // 100)

    return report
