"""Storage pools: defined once for the whole cluster, shared or local.

A *local* pool is a directory on every node, each holding that node's own
volumes; the default pool `local` is `DATA_DIR/pools/local` on each node. A
*shared* pool is the same storage on every node that mounts it (NFS, a
cluster file system) at the same path. vmhive does not mount it: creating one
writes a `.vmhive-pool` file with the pool's id into the directory, and a node
uses the pool only while it finds that file there, so an empty mount point
(the storage not mounted) is never mistaken for the storage. Every heartbeat
checks the pools again and records, in the node's row, which pools it can use:
placement and migration read that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound
from vmhive.storage.pools import POOL_TYPES, Capacity, PoolDriver, PoolError, driver_for
from vmhive.store.db import insert_if_absent
from vmhive.store.models import Disk, Pool, Vm, Volume

DEFAULT_POOL = "local"
MARKER_FILE = ".vmhive-pool"
POOL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class PoolView:
    name: str
    type: str
    shared: bool
    path: Path  # on this node
    capacity: Capacity | None  # None: not usable here
    volumes: int
    problem: str | None  # why this node cannot use it

    @property
    def usable(self) -> bool:
        return self.problem is None


def read_marker(path: Path) -> str | None:
    try:
        return (path / MARKER_FILE).read_text().strip() or None
    except OSError:
        return None


def make_directory(directory: Path, marker: str | None, made: list[Path]) -> None:
    """A local pool's directory is made here (and by each node at its next check);
    a shared pool's must be there already (mounted) and is marked as the pool."""
    if marker is None:
        if not directory.exists():
            directory.mkdir(parents=True)
            made.append(directory)
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        return
    if not directory.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, "no such directory: mount the shared storage there first"
        )
    found = read_marker(directory)
    if found is not None:
        raise FileExistsError(errno.EEXIST, f"it already holds a vmhive pool ({found})")
    (directory / MARKER_FILE).write_text(marker + "\n")
    made.append(directory / MARKER_FILE)


def unmake_directory(directory: Path, made: list[Path]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir() if path == directory else path.unlink()


class PoolService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.usable: frozenset[str] = frozenset()  # as of the last `refresh`
        self._dir_paths: tuple[str, ...] = ()

    def path_of(self, pool: Pool) -> Path:
        """The pool's directory on this node."""
        if pool.name == DEFAULT_POOL:
            return self.ctx.settings.data_dir / "pools" / DEFAULT_POOL
        return Path(pool.path)

    def driver(self, pool: Pool) -> PoolDriver:
        return driver_for(pool.type, str(self.path_of(pool)))

    def problem(self, pool: Pool) -> str | None:
        """Why this node cannot use the pool now, or None. A local pool's directory
        is made when missing; a shared pool's is only checked for its marker."""
        path = self.path_of(pool)
        if pool.shared:
            found = read_marker(path)
            if found is None:
                return f"{path} is not mounted here (no {MARKER_FILE} in it)"
            if found != pool.marker:
                return f"{path} holds another pool ({MARKER_FILE} says {found})"
            return None
        try:
            self.driver(pool).prepare()
        except (OSError, PoolError) as exc:
            return f"{path} cannot be used: {exc}"
        return None

    async def refresh(self) -> list[str]:
        """Make sure the default pool exists, check every pool, and return the names
        of those this node can use (sorted)."""
        async with self.ctx.sessions() as session:
            if await session.scalar(select(Pool.id).where(Pool.name == DEFAULT_POOL)) is None:
                path = str(self.ctx.settings.data_dir / "pools" / DEFAULT_POOL)
                await insert_if_absent(session, Pool, name=DEFAULT_POOL, type="dir", path=path)
                await session.commit()
            pools = list(await session.scalars(select(Pool)))
        problems = await asyncio.to_thread(lambda: {p.name: self.problem(p) for p in pools})
        self.usable = frozenset(name for name, why in problems.items() if why is None)
        self._dir_paths = tuple(
            str(self.path_of(p)) for p in pools if p.type == "dir" and p.name in self.usable
        )
        return sorted(self.usable)

    def dir_paths(self) -> tuple[str, ...]:
        """The directories of the usable dir pools (for the clean-up of partial files)."""
        return self._dir_paths

    # -- reading ------------------------------------------------------------------

    async def list(self) -> list[PoolView]:
        async with self.ctx.sessions() as session:
            rows = list(await session.scalars(select(Pool).order_by(Pool.name)))
            here = or_(Volume.node_id.is_(None), Volume.node_id == self.ctx.node_id)
            grouped = await session.execute(
                select(Volume.pool_id, func.count()).where(here).group_by(Volume.pool_id)
            )
            counts: dict[int, int] = {pool_id: n for pool_id, n in grouped}

        def view(pool: Pool) -> PoolView:
            why = self.problem(pool)
            capacity = self.driver(pool).capacity() if why is None else None
            return PoolView(
                pool.name, pool.type, pool.shared, self.path_of(pool), capacity,
                counts.get(pool.id, 0), why,
            )  # fmt: skip

        return await asyncio.to_thread(lambda: [view(p) for p in rows])

    async def get(self, name: str) -> PoolView:
        for view in await self.list():
            if view.name == name:
                return view
        raise NotFound(f"no storage pool named {name!r}")

    async def usable_pool(self, name: str) -> tuple[Pool, Path]:
        """A pool this node can put files in now, and its directory here."""
        async with self.ctx.sessions() as session:
            pool = await session.scalar(select(Pool).where(Pool.name == name))
        if pool is None:
            raise NotFound(f"no storage pool named {name!r}")
        why = await asyncio.to_thread(self.problem, pool)
        if why is not None:
            raise Conflict(f"pool {name} is not usable on this node: {why}")
        return pool, self.path_of(pool)

    async def shared_paths(self) -> dict[str, Path]:
        """The shared pools, by name, and their directory (the same on every node)."""
        async with self.ctx.sessions() as session:
            pools = list(await session.scalars(select(Pool).where(Pool.shared.is_(True))))
        return {pool.name: self.path_of(pool) for pool in pools}

    # -- changes ----------------------------------------------------------------

    async def create(self, name: str, path: str, *, shared: bool, type: str = "dir") -> PoolView:
        if not POOL_NAME_RE.fullmatch(name):
            raise InvalidRequest(
                f"invalid pool name {name!r}: use lower-case letters, digits, '_' and '-'"
            )
        if type not in POOL_TYPES:
            raise InvalidRequest(f"pool type must be one of {', '.join(POOL_TYPES)}")
        directory = Path(path)
        if not directory.is_absolute() or ".." in directory.parts:
            raise InvalidRequest(f"pool path must be an absolute path, got {path!r}")
        async with self.ctx.sessions() as session:
            if await session.scalar(select(Pool.id).where(Pool.name == name)) is not None:
                raise Conflict(f"a pool named {name!r} already exists")
            for other in await session.scalars(select(Pool)):
                there = self.path_of(other)
                if (
                    directory == there
                    or directory.is_relative_to(there)
                    or there.is_relative_to(directory)
                ):
                    raise Conflict(f"{path} overlaps pool {other.name} ({there})")
        marker = str(uuidlib.uuid4()) if shared else None
        made: list[Path] = []
        try:
            await asyncio.to_thread(make_directory, directory, marker, made)
        except OSError as exc:
            raise InvalidRequest(f"cannot use {path} for a pool: {exc.strerror or exc}") from None
        try:
            async with self.ctx.sessions() as session:
                session.add(Pool(name=name, type=type, path=str(directory), shared=shared,
                                 marker=marker))  # fmt: skip
                await session.commit()
        except IntegrityError:
            await asyncio.to_thread(unmake_directory, directory, made)
            raise Conflict(f"a pool named {name!r} already exists") from None
        await self.refresh()
        return await self.get(name)

    async def delete(self, name: str) -> None:
        """Forget a pool holding no volume and no VM disk. Its directory stays (it may
        hold other files); a shared pool loses its marker, so no node uses it."""
        if name == DEFAULT_POOL:
            raise Conflict(f"pool {DEFAULT_POOL} is the default pool and stays")
        async with self.ctx.sessions() as session:
            pool = await session.scalar(select(Pool).where(Pool.name == name))
            if pool is None:
                raise NotFound(f"no storage pool named {name!r}")
            volumes = await session.scalar(select(func.count()).where(Volume.pool_id == pool.id))
            if volumes:
                raise Conflict(f"pool {name} still holds {volumes} volumes: delete them first")
            inside = f"{pool.path.rstrip('/')}/%"
            users = sorted(
                set(
                    await session.scalars(
                        select(Vm.name)
                        .join(Disk, Disk.vm_id == Vm.id)
                        .where(Disk.path.like(inside))
                    )
                )
            )
            if users:
                raise Conflict(f"VM {', '.join(users)} has disks in pool {name}: delete it first")
            directory, shared, marker = Path(pool.path), pool.shared, pool.marker
            await session.delete(pool)
            await session.commit()
        if shared and read_marker(directory) == marker:
            with contextlib.suppress(OSError):
                (directory / MARKER_FILE).unlink()
        await self.refresh()
