"""The VM list (`GET /api/vms`) as JSON, from plain rows.

A cluster lists 10,000 VMs and more at once. As ORM objects (each VM with its
disks, CD-ROMs and NICs, every one tracked by the session) and then 40,000
validated response models they cost several times the rest of the request, so
the list reads only the columns it shows, one Core statement per table,
groups the devices by VM in Python and writes the JSON with pydantic-core.
Every VM comes out with exactly the keys, order and values of `VmOut.of` for
that VM alone (`GET /api/vms/NAME`): tests/unit/test_vm_list.py compares the
two on both stores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from vmhive.storage import cloudinit
from vmhive.storage.cloudinit import CloudInitConfig
from vmhive.store.models import Cdrom, Disk, Network, Nic, Node, Vm

Device = dict[str, Any]
Rows = Sequence[Sequence[Any]]
NONE: tuple[Device, ...] = ()  # a VM without devices of a kind (JSON: [])
PLAIN_JSON = TypeAdapter(list[dict[str, Any]])


async def list_json(session: AsyncSession, lease_of: Callable[[str], str | None]) -> bytes:
    """Every VM but those being deleted, by name, as a JSON array; `lease_of`: a
    MAC's last known DHCP address (the cached one, as the list has always shown)."""
    # Table columns, not the mapped attributes: plain Core statements, no ORM
    # compilation or loading step.
    vm, node, disk, cdrom, nic, network = (
        model.__table__ for model in (Vm, Node, Disk, Cdrom, Nic, Network)
    )
    vms = (
        await session.execute(
            select(
                vm.c.id,
                vm.c.name,
                vm.c.uuid,
                vm.c.description,
                vm.c.generation,
                vm.c.vcpus,
                vm.c.memory_mib,
                vm.c.machine,
                vm.c.state,
                vm.c.state_reason,
                vm.c.desired_state,
                vm.c.accel,
                vm.c.pid,
                vm.c.autostart,
                vm.c.is_template,
                vm.c.cloudinit,
                vm.c.cloudinit_instance_id,
                # Only what is shown is decoded: most VMs keep no settings.
                case((vm.c.cloudinit, vm.c.cloudinit_config)),
                vm.c.boot_order,
                vm.c.kernel,
                vm.c.initrd,
                vm.c.cmdline,
                vm.c.created_at,
                vm.c.updated_at,
                func.coalesce(node.c.name, ""),
            )
            .outerjoin(node, node.c.id == vm.c.node_id)
            .where(vm.c.state != "deleting")
            .order_by(vm.c.name)
        )
    ).all()
    disks = (
        await session.execute(
            select(
                disk.c.vm_id,
                disk.c.index,
                disk.c.path,
                disk.c.format,
                disk.c.size_bytes,
                disk.c.source,
                disk.c.image,
            ).order_by(disk.c.vm_id, disk.c.index)
        )
    ).all()
    cdroms = (
        await session.execute(
            select(cdrom.c.vm_id, cdrom.c.index, cdrom.c.iso).order_by(cdrom.c.vm_id, cdrom.c.index)
        )
    ).all()
    nics = (
        await session.execute(
            select(
                nic.c.vm_id,
                nic.c.index,
                nic.c.mac,
                nic.c.model,
                nic.c.backend,
                network.c.name,
                nic.c.ip,
                nic.c.link_up,
                nic.c.vlan,
            )
            .outerjoin(network, network.c.id == nic.c.network_id)
            .order_by(nic.c.vm_id, nic.c.index)
        )
    ).all()
    return PLAIN_JSON.dump_json(_listed(vms, disks, cdroms, nics, lease_of))


def _listed(
    vms: Rows,
    disk_rows: Rows,
    cdrom_rows: Rows,
    nic_rows: Rows,
    lease_of: Callable[[str], str | None],
) -> list[dict[str, Any]]:
    """The VMs as dicts with VmOut's keys in its order; the device rows come
    ordered by VM, then index, as each VM lists them."""
    disks: dict[int, list[Device]] = defaultdict(list)
    for vm_id, index, path, disk_format, size_bytes, source, image in disk_rows:
        disks[vm_id].append(
            {
                "index": index,
                "path": path,
                "format": disk_format,
                "size_bytes": size_bytes,
                "source": source,
                "image": image,
            }
        )
    cdroms: dict[int, list[Device]] = defaultdict(list)
    for vm_id, index, iso in cdrom_rows:
        cdroms[vm_id].append({"index": index, "iso": iso})
    nics: dict[int, list[Device]] = defaultdict(list)
    for vm_id, index, mac, model, backend, network, reserved_ip, link_up, vlan in nic_rows:
        nics[vm_id].append(
            {
                "index": index,
                "mac": mac,
                "model": model,
                "backend": backend,
                "network": network,
                "ip": lease_of(mac),
                "reserved_ip": reserved_ip,
                "link_up": link_up,
                "vlan": vlan,
            }
        )
    listed = []
    for (
        vm_id,
        name,
        vm_uuid,
        description,
        generation,
        vcpus,
        memory_mib,
        machine,
        state,
        state_reason,
        desired_state,
        accel,
        pid,
        autostart,
        is_template,
        cloud_init,
        base_id,
        config,
        boot_order,
        kernel,
        initrd,
        cmdline,
        created_at,
        updated_at,
        node,
    ) in vms:
        vm_nics = nics.get(vm_id, NONE)
        seed_id = (
            instance_id(config, base_id or vm_uuid, name, [nic["mac"] for nic in vm_nics])
            if cloud_init
            else None
        )
        listed.append(
            {
                "name": name,
                "uuid": vm_uuid,
                "description": description,
                "generation": generation,
                "vcpus": vcpus,
                "memory_mib": memory_mib,
                "machine": machine,
                "state": state,
                "state_reason": state_reason,
                "desired_state": desired_state,
                "accel": accel,
                "pid": pid,
                "autostart": autostart,
                "is_template": is_template,
                "cloud_init": cloud_init,
                "cloud_init_instance_id": seed_id,
                "boot_order": boot_order,
                "kernel": kernel,
                "initrd": initrd,
                "cmdline": cmdline,
                "disks": disks.get(vm_id, NONE),
                "cdroms": cdroms.get(vm_id, NONE),
                "nics": vm_nics,
                "created_at": created_at,
                "updated_at": updated_at,
                "node": node,
            }
        )
    return listed


def instance_id(config: dict[str, Any] | None, base_id: str, vm_name: str, macs: list[str]) -> str:
    """The instance-id the VM's seed carries (services.cloudinit.seed_of, from plain values).

    It is the stored base id plus a digest of the seed's content (hostname,
    keys, user-data, network-config by MAC), so it is rendered here: about
    12 us a VM.
    """
    seed = cloudinit.render(
        CloudInitConfig.from_json(config), base_id=base_id, vm_name=vm_name, macs=macs
    )
    return seed.instance_id
