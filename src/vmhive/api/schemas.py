"""Pydantic schemas of the REST API: the stable JSON that clients see."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmhive.services.cloudinit import seed_of
from vmhive.services.errors import InvalidRequest
from vmhive.storage.cloudinit import CloudInitConfig, CloudInitError, CloudUser, parse_ipconfig
from vmhive.storage.images import Image
from vmhive.store.models import Job, JobLog, Nic, Vm


class DiskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: str | int | None = Field(
        None, description="size of a blank disk, or to grow an image to: 10G, 512M or bytes"
    )
    image: str | None = Field(None, description="image to create the disk from")
    mode: str | None = Field(
        None,
        description="overlay (copy-on-write; the default) or copy (the default in a shared pool)",
    )


class CloudUserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    ssh_authorized_keys: list[str] = []
    hashed_passwd: str | None = Field(None, description="a crypt(3) hash, never plain text")
    sudo: bool = True


class CloudInitIn(BaseModel):
    """A VM's cloud-init settings; PUT replaces them all."""

    model_config = ConfigDict(extra="forbid")
    hostname: str | None = Field(None, description="default: the VM's name")
    users: list[CloudUserIn] = []
    ssh_keys: list[str] = Field([], description="keys for the image's default user")
    user_data: str | None = Field(None, description="your own user-data, replacing vmhive's")
    network_config: str | None = Field(None, description="your own network-config (v1 or v2)")
    ipconfig: list[str] = Field(
        [], description="per NIC, in order: dhcp, or ip=10.0.0.5/24[,gw=10.0.0.1]"
    )
    nameservers: list[str] = []

    def to_config(self) -> CloudInitConfig:
        try:
            ipconfig = tuple(parse_ipconfig(text, nic) for nic, text in enumerate(self.ipconfig))
        except CloudInitError as exc:
            raise InvalidRequest(f"cloud-init: {exc}") from None
        return CloudInitConfig(
            hostname=self.hostname,
            users=tuple(
                CloudUser(u.name, tuple(u.ssh_authorized_keys), u.hashed_passwd, u.sudo)
                for u in self.users
            ),
            ssh_keys=tuple(self.ssh_keys),
            user_data=self.user_data,
            network_config=self.network_config,
            ipconfig=ipconfig,
            nameservers=tuple(self.nameservers),
        )


class VmCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    generation: int = 2
    vcpus: int = 1
    memory_mib: int = 512
    disks: list[DiskIn] = []
    iso: str | None = None
    cdrom: bool = False
    boot_order: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    nic: bool = True
    mac: str | None = None
    network: str | None = Field(None, description="default: 'default' if it exists")
    nic_model: str | None = Field(None, description="virtio or e1000")
    ip: str | None = Field(None, description="a fixed address on the network (DHCP reservation)")
    autostart: bool = False
    description: str = ""
    start: bool = False
    cloud_init: bool = Field(False, description="attach a NoCloud seed (hostname = VM name)")
    user_data: str | None = Field(None, description="cloud-init user-data (implies cloud_init)")
    cloud_init_settings: CloudInitIn | None = Field(None, description="implies cloud_init")
    node: str | None = Field(None, description="the node to create it on (default: placement)")
    affinity_group: str | None = Field(
        None, description="anti-affinity: VMs of one group are placed on different nodes"
    )
    placement: str = Field("spread", description="spread (default) or pack")
    pool: str | None = Field(
        None, description="the storage pool for its disks (default: this node's data directory)"
    )


class VmClone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    linked: bool | None = Field(None, description="default: linked from a template, full otherwise")
    start: bool = False
    snapshot: str | None = Field(None, description="a full copy of the source at this snapshot")


class VmEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcpus: int | None = None
    memory_mib: int | None = None
    description: str | None = None
    boot_order: str | None = None
    autostart: bool | None = None


class DiskOut(BaseModel):
    index: int
    path: str
    format: str
    size_bytes: int
    source: str
    image: str | None


class CdromOut(BaseModel):
    index: int
    iso: str | None


class NicOut(BaseModel):
    index: int
    mac: str
    model: str | None
    backend: str
    network: str | None = None
    ip: str | None = Field(None, description="its IPv4 address, as DHCP handed it out")
    reserved_ip: str | None = None
    link_up: bool = True
    vlan: int | None = None

    @classmethod
    def of(cls, nic: Nic, ip: str | None) -> NicOut:
        return cls(
            index=nic.index,
            mac=nic.mac,
            model=nic.model,
            backend=nic.backend,
            network=nic.network.name if nic.network else None,
            ip=ip,
            reserved_ip=nic.ip,
            link_up=nic.link_up,
            vlan=nic.vlan,
        )


class VmOut(BaseModel):
    name: str
    uuid: str
    description: str
    generation: int
    vcpus: int
    memory_mib: int
    machine: str
    state: str
    state_reason: str
    desired_state: str
    accel: str | None
    pid: int | None
    autostart: bool
    is_template: bool
    cloud_init: bool
    cloud_init_instance_id: str | None
    boot_order: str
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disks: list[DiskOut]
    cdroms: list[CdromOut]
    nics: list[NicOut]
    created_at: datetime
    updated_at: datetime
    node: str = Field("", description="the node that owns it")

    @classmethod
    def of(
        cls,
        vm: Vm,
        addresses: dict[int, str | None] | None = None,
        nodes: dict[int, str] | None = None,
    ) -> VmOut:
        return cls(
            name=vm.name,
            uuid=vm.uuid,
            description=vm.description,
            generation=vm.generation,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            machine=vm.machine,
            state=vm.state,
            state_reason=vm.state_reason,
            desired_state=vm.desired_state,
            accel=vm.accel,
            pid=vm.pid,
            autostart=vm.autostart,
            is_template=vm.is_template,
            cloud_init=vm.cloudinit,
            cloud_init_instance_id=seed_of(vm).instance_id if vm.cloudinit else None,
            boot_order=vm.boot_order,
            kernel=vm.kernel,
            initrd=vm.initrd,
            cmdline=vm.cmdline,
            disks=[DiskOut.model_validate(d, from_attributes=True) for d in vm.disks],
            cdroms=[CdromOut.model_validate(c, from_attributes=True) for c in vm.cdroms],
            nics=[NicOut.of(n, (addresses or {}).get(n.index)) for n in vm.nics],
            created_at=vm.created_at,
            updated_at=vm.updated_at,
            node=(nodes or {}).get(vm.node_id or 0, ""),
        )


class JobLogOut(BaseModel):
    seq: int
    at: datetime
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    target: str | None
    state: str
    progress: int
    error: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    log: list[JobLogOut] = []

    @classmethod
    def of(cls, job: Job, logs: list[JobLog] | None = None) -> JobOut:
        out = cls.model_validate(job, from_attributes=True)
        if logs:
            out.log = [JobLogOut.model_validate(entry, from_attributes=True) for entry in logs]
        return out


class ImageOut(BaseModel):
    name: str
    path: str
    format: str
    virtual_size: int
    actual_size: int
    origin: str = Field(description="tiny, debian (built by vmhive) or imported")
    source: str = Field(description="the recipe, file or URL it came from")
    sha256: str
    created_at: datetime
    used_by: dict[str, list[str]] | None = Field(
        None, description="VMs made from it: overlay (depend on it) and copy"
    )

    @classmethod
    def of(cls, image: Image, used_by: dict[str, list[str]] | None = None) -> ImageOut:
        return cls(
            name=image.name,
            path=str(image.path),
            format=image.format,
            virtual_size=image.virtual_size,
            actual_size=image.actual_size,
            origin=image.origin,
            source=image.source,
            sha256=image.sha256,
            created_at=image.created_at,
            used_by=used_by,
        )


class ImageImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="an image file on the daemon's host or an http(s) URL")
    name: str | None = Field(None, description="default: from the source's file name")
    format: str = "auto"


class ErrorOut(BaseModel):
    detail: str
