"""Creating, editing and deleting VMs (the hardware, not the power state)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import cloudinit, specs
from vmhive.services.context import ServiceContext
from vmhive.services.errors import Conflict, InvalidRequest, NotFound, PlacedElsewhere
from vmhive.services.host import OVMF_VARS
from vmhive.services.lifecycle import Lifecycle
from vmhive.services.networks import DEFAULT_NETWORK, NetworkService, check_model
from vmhive.services.nodes import NodeService
from vmhive.services.placement import Demand
from vmhive.services.pools import PoolService
from vmhive.storage import qemu_img
from vmhive.storage.cloudinit import CloudInitConfig
from vmhive.storage.images import ImageStore
from vmhive.store.models import Cdrom, Disk, Event, Network, Nic, Vm

log = logging.getLogger(__name__)

MAX_DISK_BYTES = 64 * 1024**4
MAX_DISKS = 4  # gen 1 has four IDE slots, shared with CD-ROMs


@dataclass
class DiskRequest:
    """A blank disk (`size` only) or a disk made from an image."""

    size: int | None = None
    image: str | None = None
    mode: str | None = None  # overlay (copy-on-write) | copy; None: overlay, copy in a shared pool


@dataclass
class CreateVmRequest:
    name: str
    generation: int = 2
    vcpus: int = 1
    memory_mib: int = 512
    disks: list[DiskRequest] = field(default_factory=list)
    iso: str | None = None
    cdrom: bool = False
    boot_order: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    nic: bool = True
    mac: str | None = None
    network: str | None = None  # None: "default" if it exists, else QEMU user-mode NAT
    nic_model: str | None = None  # virtio | e1000; None: the generation's default
    ip: str | None = None  # a DHCP reservation on the network
    autostart: bool = False
    description: str = ""
    start: bool = False
    cloud_init: bool = False
    user_data: str | None = None
    cloud_init_settings: CloudInitConfig | None = None
    node: str | None = None  # None: placement chooses
    affinity_group: str | None = None  # VMs of a group go to different nodes
    placement: str = "spread"  # spread | pack
    pool: str | None = None  # where its disks go; None: this node's data directory

    @property
    def cloud_init_config(self) -> CloudInitConfig | None:
        """The settings, with a bare --user-data folded in; None: no cloud-init."""
        config = self.cloud_init_settings
        if config is None and self.user_data is None and not self.cloud_init:
            return None
        config = config or CloudInitConfig()
        if self.user_data is not None:
            if config.user_data is not None:
                raise InvalidRequest("user-data is given twice")
            config = dataclasses.replace(config, user_data=self.user_data)
        return config


@dataclass
class EditVmRequest:
    vcpus: int | None = None
    memory_mib: int | None = None
    description: str | None = None
    boot_order: str | None = None
    autostart: bool | None = None


class VmService:
    def __init__(
        self,
        ctx: ServiceContext,
        lifecycle: Lifecycle,
        networks: NetworkService,
        nodes: NodeService | None = None,
        pools: PoolService | None = None,
    ) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.networks = networks
        self.nodes = nodes
        self.pools = pools
        self.images = ImageStore(ctx.settings.images)

    def allowed_roots(self) -> list[Path]:
        return [self.ctx.settings.images, self.ctx.settings.data_dir / "iso"]

    # -- create ---------------------------------------------------------------

    async def _choose_node(self, req: CreateVmRequest) -> int | None:
        """This node, if placement (or --node) picks it; a VM is created where it runs.

        On a single node there is nothing to choose: the VM goes there, as before
        nodes existed (no capacity check for a VM that is only created).
        """
        if self.nodes is None:
            return self.ctx.node_id
        views = await self.nodes.list()
        if req.node is not None:
            if req.node not in {v.name for v in views}:
                raise NotFound(f"no node named {req.node!r}")
            target = req.node
        elif len(views) <= 1:
            return self.ctx.node_id
        else:
            demand = Demand(
                vcpus=req.vcpus,
                memory_mib=req.memory_mib,
                storage_bytes=sum(d.size or 0 for d in req.disks),
                affinity_group=req.affinity_group,
                pools=(req.pool,) if req.pool else (),
            )
            verdict = await self.nodes.place(demand, req.placement)
            if verdict.node is None:
                raise Conflict(verdict.explain())
            target = verdict.node
        if target != self.nodes.name:
            raise PlacedElsewhere(target)
        return self.ctx.node_id

    async def create(self, req: CreateVmRequest) -> str:
        """Validate, reserve the name, and submit the job that builds the VM."""
        specs.check_name(req.name)
        if req.generation not in (1, 2):
            raise InvalidRequest(f"generation must be 1 or 2, got {req.generation}")
        specs.check_resources(req.vcpus, req.memory_mib, req.generation)
        cloud_config = req.cloud_init_config
        if cloud_config is not None:
            cloudinit.check(cloud_config, 1 if req.nic else 0)
        seed = 0 if cloud_config is None else 1
        if len(req.disks) + (1 if req.iso or req.cdrom else 0) + seed > MAX_DISKS:
            raise InvalidRequest(f"at most {MAX_DISKS} disks and CD-ROMs together")
        boot_order = req.boot_order or ("cdrom,disk,network" if req.iso else "disk,cdrom,network")
        specs.parse_boot_order(boot_order)
        roots = self.allowed_roots()
        iso = str(specs.resolve_iso(self.ctx.settings, req.iso)) if req.iso else None
        kernel = str(specs.check_path_under(req.kernel, roots, "kernel")) if req.kernel else None
        initrd = str(specs.check_path_under(req.initrd, roots, "initrd")) if req.initrd else None
        if initrd and not kernel:
            raise InvalidRequest("an initrd needs a kernel")
        if req.cmdline and not kernel:
            raise InvalidRequest("a kernel command line needs a kernel")
        shared = False
        if req.pool is not None:
            if self.pools is None:
                raise InvalidRequest("this daemon has no storage pools")
            shared = (await self.pools.get(req.pool)).shared
        sources = [await self._check_disk(d, req.pool if shared else None) for d in req.disks]
        mac = specs.check_mac(req.mac) if req.mac else None
        if req.affinity_group is not None:
            specs.check_name(req.affinity_group)
        node_id = await self._choose_node(req)
        pool_dir = None
        if req.pool is not None and self.pools is not None:
            pool_dir = (await self.pools.usable_pool(req.pool))[1]

        nic_model = check_model(req.nic_model)
        vm_uuid = str(uuidlib.uuid4())
        async with self.ctx.sessions() as session:
            taken = set(await session.scalars(select(Nic.mac)))
            if mac and mac in taken:
                raise Conflict(f"MAC address {mac} is already in use")
            network, ip = None, None
            if req.nic:
                wanted = req.network
                if wanted is None and await session.scalar(
                    select(Network.id).where(Network.name == DEFAULT_NETWORK)
                ):
                    wanted = DEFAULT_NETWORK
                taken_ips = set(await session.scalars(select(Nic.ip).where(Nic.ip.is_not(None))))
                network, ip = await self.networks.resolve_nic(session, wanted, req.ip, taken_ips)
            elif req.network or req.ip:
                raise InvalidRequest("--network and --ip need a NIC")
            vm = Vm(
                uuid=vm_uuid,
                name=req.name,
                description=req.description,
                generation=req.generation,
                vcpus=req.vcpus,
                memory_mib=req.memory_mib,
                machine=self.ctx.host.machines[req.generation],
                boot_order=boot_order,
                kernel=kernel,
                initrd=initrd,
                cmdline=req.cmdline,
                autostart=req.autostart,
                desired_state="stopped",
                state="creating",
                cloudinit=cloud_config is not None,
                cloudinit_instance_id=str(uuidlib.uuid4()),
                cloudinit_config=cloud_config.to_json() if cloud_config else None,
                node_id=node_id,
                affinity_group=req.affinity_group,
            )
            if iso or req.cdrom:
                vm.cdroms.append(Cdrom(index=0, iso=iso))
            if req.nic:
                vm.nics.append(
                    Nic(
                        index=0,
                        mac=mac or specs.random_mac(taken),
                        model=nic_model,
                        backend="tap" if network else "user",
                        network_id=network.id if network else None,
                        ip=ip,
                    )
                )
            session.add(vm)
            session.add(Event(vm_uuid=vm_uuid, kind="create", message=f"{req.name}: created"))
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"a VM named {req.name!r} already exists") from None
        if self.nodes is not None:
            self.nodes.forget_usage()  # the next placement sees this VM (and its group)

        reserved_on = network.id if network is not None and ip is not None else None

        async def job(ctx: JobContext) -> dict[str, Any]:
            await self._build(ctx, vm_uuid, req, sources, pool_dir)
            if reserved_on is not None:
                await self.networks.update_reservations(reserved_on)
            if req.start:
                await self.lifecycle.do_start(ctx, vm_uuid)
            return {"vm": req.name, "uuid": vm_uuid}

        return await self.ctx.runner.submit(
            "vm.create", f"vm:{vm_uuid}", job, params={"name": req.name}
        )

    async def _check_disk(
        self, disk: DiskRequest, shared_pool: str | None = None
    ) -> tuple[DiskRequest, Path | None, str, int]:
        """`shared_pool`: the disk goes there, so an image is copied in full by default
        (an overlay there would need this node's image library on every node)."""
        disk = dataclasses.replace(disk, mode=disk.mode or ("copy" if shared_pool else "overlay"))
        if disk.mode not in ("overlay", "copy"):
            raise InvalidRequest(f"disk mode must be overlay or copy, got {disk.mode!r}")
        if shared_pool and disk.image and disk.mode == "overlay":
            raise InvalidRequest(
                f"an overlay in shared pool {shared_pool} would need image {disk.image} "
                "at the same path on every node: use mode copy"
            )
        if disk.size is not None and not 1024 * 1024 <= disk.size <= MAX_DISK_BYTES:
            raise InvalidRequest("disk size must be between 1 MiB and 64 TiB")
        if disk.image is None:
            if disk.size is None:
                raise InvalidRequest("a blank disk needs a size")
            return disk, None, "qcow2", disk.size
        image = await self.images.get(disk.image)
        if image is None:
            raise InvalidRequest(f"unknown image {disk.image!r} (see `vmhive image list`)")
        if disk.size is not None and disk.size < image.virtual_size:
            raise InvalidRequest(
                f"disk size {disk.size} is smaller than image {disk.image} ({image.virtual_size})"
            )
        return disk, image.path, image.format, disk.size or image.virtual_size

    async def _build(
        self,
        ctx: JobContext,
        vm_uuid: str,
        req: CreateVmRequest,
        sources: list[tuple[DiskRequest, Path | None, str, int]],
        pool_dir: Path | None = None,
    ) -> None:
        """The VM's folder in the data directory holds its UEFI variables, and its
        disks too unless they go to a pool (`POOL/vms/UUID/`)."""
        settings = self.ctx.settings
        directory = settings.vms_dir / vm_uuid
        disk_dir = directory if pool_dir is None else pool_dir / "vms" / vm_uuid

        async def remove_vm() -> None:
            await asyncio.to_thread(shutil.rmtree, disk_dir, True)
            await self.ctx.discard_vm(vm_uuid)

        ctx.on_rollback(f"remove the half-created VM {req.name}", remove_vm)
        directory.mkdir(parents=True, exist_ok=False)
        disk_dir.mkdir(parents=True, exist_ok=True)
        if pool_dir is not None:
            await ctx.log(f"disks in {disk_dir}")
        rows: list[Disk] = []
        for index, (disk, source, fmt, size) in enumerate(sources):
            path = disk_dir / f"disk{index}.qcow2"
            step = f"disk {index}"
            if source is None:
                await ctx.log(f"{step}: blank qcow2 of {size} bytes")
                await qemu_img.create_blank(path, size)
                kind = "blank"
            elif disk.mode == "overlay":
                await ctx.log(f"{step}: copy-on-write overlay on image {disk.image}")
                await qemu_img.create_overlay(path, source, fmt, disk.size)
                kind = "overlay"
            else:
                await ctx.log(f"{step}: full copy of image {disk.image}")
                share = 80 // max(1, len(sources))

                async def report(
                    percent: int, base: int = index * share, span: int = share
                ) -> None:
                    await ctx.progress(base + percent * span // 100)

                await qemu_img.convert(source, fmt, path, "qcow2", progress=report)
                if disk.size is not None:
                    await qemu_img.resize(path, disk.size)
                kind = "copy"
            rows.append(
                Disk(
                    index=index,
                    path=str(path),
                    format="qcow2",
                    size_bytes=size,
                    source=kind,
                    image=disk.image,
                )
            )
        if req.generation == 2:
            await ctx.log("UEFI: the VM's own copy of the firmware variables")
            await asyncio.to_thread(shutil.copyfile, OVMF_VARS, directory / specs.VARS_FILE)
        async with self.ctx.sessions() as session:
            vm = await session.scalar(select(Vm).where(Vm.uuid == vm_uuid))
            if vm is None:
                raise JobError("the VM vanished while it was being created")
            vm.disks.extend(rows)
            vm.state = "stopped"
            await session.commit()
        await ctx.progress(90 if req.start else 100)
        ctx.commit()

    # -- edit -------------------------------------------------------------------

    async def edit(self, name: str, req: EditVmRequest) -> Vm:
        async with self.ctx.sessions() as session:
            vm = await self.ctx.find_vm(session, name)
            hardware = req.vcpus is not None or req.memory_mib is not None or req.boot_order
            if hardware and vm.state not in ("stopped", "crashed"):
                raise Conflict(f"VM {name} must be stopped to change vCPUs, memory or boot order")
            specs.check_resources(
                req.vcpus or vm.vcpus, req.memory_mib or vm.memory_mib, vm.generation
            )
            if req.boot_order is not None:
                specs.parse_boot_order(req.boot_order)
                vm.boot_order = req.boot_order
            if req.vcpus is not None:
                vm.vcpus = req.vcpus
            if req.memory_mib is not None:
                vm.memory_mib = req.memory_mib
            if req.description is not None:
                vm.description = req.description
            if req.autostart is not None:
                vm.autostart = req.autostart
            session.add(Event(vm_uuid=vm.uuid, kind="edit", message=f"{name}: edited"))
            await session.commit()
            return vm

    # -- delete -----------------------------------------------------------------

    async def delete(self, name: str, *, force: bool = False) -> str:
        vm = await self.ctx.load_vm(name)
        running = self.ctx.driver.is_running(vm.uuid)
        if running and not force:
            raise Conflict(f"VM {name} is running: stop it first, or delete with --force")
        if vm.state == "creating":
            raise Conflict(f"VM {name} is still being created")
        if vm.is_template and (clones := await self.linked_clones_of(vm)):
            raise Conflict(f"template {name} still has linked clones: {', '.join(clones)}")
        vm_uuid = vm.uuid

        async def job(ctx: JobContext) -> dict[str, Any]:
            if self.ctx.driver.is_running(vm_uuid):
                await ctx.log("forcing the VM off")
                await self.ctx.driver.kill(vm_uuid)
            # Past this mark the deletion is rolled forward, even after a crash.
            await self.ctx.record_state(vm_uuid, "deleting", "", desired="stopped", pid=None)
            ctx.commit()
            await self.finish_delete(vm_uuid)
            await ctx.log("removed disks, firmware variables, sockets and logs")
            return {"vm": name}

        return await self.ctx.runner.submit(
            "vm.delete", f"vm:{vm_uuid}", job, params={"name": name}
        )

    async def linked_clones_of(self, vm: Vm) -> list[str]:
        """Names of the VMs whose disks are overlays on this VM's disks."""
        ids = [d.id for d in vm.disks]
        if not ids:
            return []
        async with self.ctx.sessions() as session:
            query = (
                select(Vm.name)
                .join(Disk, Disk.vm_id == Vm.id)
                .where(Disk.base_disk_id.in_(ids))
                .distinct()
            )
            return sorted(await session.scalars(query))

    async def finish_delete(self, vm_uuid: str) -> None:
        """Remove every file a VM owns, then its record. Safe to run twice."""
        await self.ctx.driver.cleanup(vm_uuid, specs.runtime_paths(self.ctx.settings, vm_uuid))
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        networks = {n.network_id for n in vm.nics if n.network_id} if vm else set()
        await self.networks.unplug(vm_uuid)
        await self.ctx.discard_vm(vm_uuid, deleted_event=True)
        try:
            for network_id in networks:
                await self.networks.update_reservations(network_id)
            if networks:
                await self.networks.apply_firewall()
        except JobError as exc:  # the VM is gone; its leftovers are `host cleanup`'s
            log.error("network update after deleting VM %s failed: %s", vm_uuid, exc)
