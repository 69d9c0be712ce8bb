"""The image store as users see it: list, show, build, import, delete."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmhive.guest import tiny
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import imports
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.storage.images import Image, ImageStore
from vmhive.store.models import Disk, Vm

IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
TINY_ARTIFACTS = (tiny.IMAGE_NAME, tiny.KERNEL_NAME, tiny.INITRD_NAME, tiny.STAMP_NAME)
RECIPES = ("tiny", "debian")


def check_image_name(name: str) -> None:
    if not IMAGE_NAME_RE.fullmatch(name) or name.endswith((".qcow2", ".raw", ".img")):
        raise InvalidRequest(
            f"invalid image name {name!r}: up to 64 letters, digits, '.', '_' and '-', "
            "without a file suffix"
        )


class ImageService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.store = ImageStore(ctx.settings.images)

    async def get(self, name: str) -> Image | None:
        return await self.store.get(name)

    async def show(self, name: str) -> Image:
        image = await self.store.get(name)
        if image is None:
            raise NotFound(f"no image named {name!r} (see `vmhive image list`)")
        return image

    async def list_images(self) -> list[Image]:
        return await self.store.list()

    async def users(self, name: str) -> dict[str, list[str]]:
        """VMs made from the image: `overlay` ones depend on it, `copy` ones do not."""
        async with self.ctx.sessions() as session:
            rows = await session.execute(
                select(Vm.name, Disk.source).join(Disk).where(Disk.image == name).distinct()
            )
            users: dict[str, list[str]] = {"overlay": [], "copy": []}
            for vm_name, source in rows.tuples():
                users.setdefault(source, []).append(vm_name)
        return {kind: sorted(set(names)) for kind, names in users.items()}

    async def delete(self, name: str) -> None:
        await self.show(name)
        dependants = (await self.users(name))["overlay"]
        if dependants:
            raise Conflict(
                f"image {name} is the base of the disks of: {', '.join(dependants)} "
                "(delete those VMs first)"
            )
        await asyncio.to_thread(self.store.remove, name)

    # -- build ---------------------------------------------------------------------

    async def build(self, recipe: str) -> str:
        """Build (or refresh) a recipe's image: tiny (busybox) or debian (debootstrap)."""
        if recipe not in RECIPES:
            raise NotFound(f"unknown image recipe {recipe!r}; use one of {', '.join(RECIPES)}")
        builder: Callable[[], Path] = self._build_tiny if recipe == "tiny" else self._build_debian

        async def job(ctx: JobContext) -> dict[str, Any]:
            await ctx.log(f"building the {recipe} image into {self.ctx.settings.images}")
            try:
                path = await asyncio.to_thread(builder)
            except Exception as exc:
                raise JobError(f"{recipe} image build failed: {exc}") from exc
            image = await self.store.record(recipe, recipe, f"vmhive image build {recipe}")
            await ctx.log(f"image ready: {path} (sha256 {image.sha256})")
            return {"image": recipe, "path": str(path), "sha256": image.sha256}

        return await self.ctx.runner.submit(f"image.build-{recipe}", f"image:{recipe}", job)

    def _build_tiny(self) -> Path:
        """Build into the image dir, or copy from a prebuilt seed (VMHIVE_IMAGE_SEED)."""
        images = self.ctx.settings.images
        seed = os.environ.get("VMHIVE_IMAGE_SEED")
        if seed and Path(seed).resolve() != images.resolve():
            built = tiny.build_tiny_image(Path(seed))
            for name in TINY_ARTIFACTS:
                shutil.copyfile(built.parent / name, images / (name + ".tmp"))
                (images / (name + ".tmp")).replace(images / name)
            return images / tiny.IMAGE_NAME
        return tiny.build_tiny_image(images)

    def _build_debian(self) -> Path:
        from vmhive.guest import debian

        return debian.build_debian_image(self.ctx.settings.images)

    # -- import --------------------------------------------------------------------

    async def import_image(self, source: str, name: str | None, fmt: str = "auto") -> str:
        """A disk image from a file or URL, inspected and converted into the store as qcow2."""
        src = await imports.check_source(self.ctx.settings, source, fmt)
        name = name or src.default_name
        check_image_name(name)
        if name in RECIPES:
            raise InvalidRequest(f"{name!r} is the name of a built image; choose another")
        if self.store.path_of(name) is not None:
            raise Conflict(f"an image named {name!r} already exists")
        dest = self.ctx.settings.images / f"{name}.qcow2"

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.store.path_of(name) is not None:  # jobs on one image run one at a time
                raise JobError(f"an image named {name!r} already exists")

            async def remove() -> None:
                await asyncio.to_thread(self.store.remove, name)

            ctx.on_rollback(f"remove the half-imported image {name}", remove)
            await imports.convert_into(ctx, self.ctx.settings, src, dest)
            image = await self.store.record(name, "imported", source)
            return {"image": name, "path": str(dest), "sha256": image.sha256}

        return await self.ctx.runner.submit(
            "image.import", f"image:{name}", job, params={"name": name}, cancellable=True
        )
