"""SQLAlchemy models. Portable SQL only: SQLite now, PostgreSQL for clusters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from vmhive.store.types import UtcDateTime


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Vm(Base):
    """A VM: its hardware (what the user configured) and its three kinds of state.

    desired_state: what the user asked for (running | stopped).
    state: what QEMU was last observed doing (stopped, starting, running,
    paused, stopping, crashed) or a lifecycle mark (creating, deleting).
    The in-flight job lives in the jobs table.
    """

    __tablename__ = "vms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    generation: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    machine: Mapped[str] = mapped_column(String(64))
    boot_order: Mapped[str] = mapped_column(String(64), default="disk,cdrom,network")
    kernel: Mapped[str | None] = mapped_column(Text, nullable=True)
    initrd: Mapped[str | None] = mapped_column(Text, nullable=True)
    cmdline: Mapped[str | None] = mapped_column(Text, nullable=True)
    autostart: Mapped[bool] = mapped_column(Boolean, default=False)
    # A template is read-only and never runs: VMs are cloned from it.
    is_template: Mapped[bool] = mapped_column(Boolean, default=False)
    # cloud-init (NoCloud seed CD-ROM): a new instance id makes a clone a new machine.
    cloudinit: Mapped[bool] = mapped_column(Boolean, default=False)
    cloudinit_instance_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # hostname, users, keys, user-data, network-config: storage.cloudinit.CloudInitConfig
    cloudinit_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    desired_state: Mapped[str] = mapped_column(String(16), default="stopped")
    state: Mapped[str] = mapped_column(String(16), default="creating")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    accel: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # The node that owns the VM: the only one that may run it (nodes.id; no
    # foreign key, so adding it needed no table rebuild on SQLite).
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    # VMs of the same anti-affinity group are placed on different nodes.
    affinity_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)

    disks: Mapped[list[Disk]] = relationship(
        back_populates="vm", order_by="Disk.index", cascade="all, delete-orphan", lazy="selectin"
    )
    cdroms: Mapped[list[Cdrom]] = relationship(
        back_populates="vm", order_by="Cdrom.index", cascade="all, delete-orphan", lazy="selectin"
    )
    nics: Mapped[list[Nic]] = relationship(
        back_populates="vm", order_by="Nic.index", cascade="all, delete-orphan", lazy="selectin"
    )


class Disk(Base):
    __tablename__ = "disks"
    __table_args__ = (UniqueConstraint("vm_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # blank | overlay | copy | volume
    image: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Set for a pool volume attached to the VM: it outlives the VM.
    volume_id: Mapped[int | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="RESTRICT"), nullable=True
    )
    # A linked clone's disk is an overlay on this template disk.
    base_disk_id: Mapped[int | None] = mapped_column(
        ForeignKey("disks.id", ondelete="RESTRICT"), nullable=True
    )

    vm: Mapped[Vm] = relationship(back_populates="disks")


class Pool(Base):
    """Where volumes live. `type` selects the pool driver (dir today).

    A pool is defined once for the cluster. A shared pool is the same storage on
    every node (a mount of NFS or a cluster file system at `path`), recognized
    by the `marker` id in its `.vmhive-pool` file; a local one is a directory on
    each node, holding that node's volumes (`Volume.node_id`).
    """

    __tablename__ = "pools"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    type: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    marker: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    volumes: Mapped[list[Volume]] = relationship(back_populates="pool", order_by="Volume.name")


class Volume(Base):
    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("pool_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text, unique=True)
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    backing_id: Mapped[int | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="RESTRICT"), nullable=True
    )
    # The node holding it, in a local pool; None in a shared pool.
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    pool: Mapped[Pool] = relationship(back_populates="volumes", lazy="joined")


class Cdrom(Base):
    __tablename__ = "cdroms"
    __table_args__ = (UniqueConstraint("vm_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    iso: Mapped[str | None] = mapped_column(Text, nullable=True)

    vm: Mapped[Vm] = relationship(back_populates="cdroms")


class Nic(Base):
    __tablename__ = "nics"
    __table_args__ = (UniqueConstraint("vm_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    model: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # "user": QEMU's user-mode NAT (no network); "tap": on `network`, through a TAP.
    backend: Mapped[str] = mapped_column(String(16), default="user")
    network_id: Mapped[int | None] = mapped_column(
        ForeignKey("networks.id", ondelete="RESTRICT"), nullable=True
    )
    ip: Mapped[str | None] = mapped_column(String(15), nullable=True)  # a DHCP reservation
    vlan: Mapped[int | None] = mapped_column(Integer, nullable=True)  # external networks
    link_up: Mapped[bool] = mapped_column(Boolean, default=True)

    vm: Mapped[Vm] = relationship(back_populates="nics")
    network: Mapped[Network | None] = relationship(lazy="joined")


class Network(Base):
    """A virtual switch; its host side is built by vmhive.network from this row."""

    __tablename__ = "networks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # As long as a name may be (network.names): PostgreSQL enforces the length.
    name: Mapped[str] = mapped_column(String(63), unique=True)
    type: Mapped[str] = mapped_column(String(16))  # nat | internal | private | external
    bridge: Mapped[str] = mapped_column(String(15), unique=True)
    subnet: Mapped[str | None] = mapped_column(String(18), nullable=True)
    gateway: Mapped[str | None] = mapped_column(String(15), nullable=True)
    dhcp_start: Mapped[str | None] = mapped_column(String(15), nullable=True)
    dhcp_end: Mapped[str | None] = mapped_column(String(15), nullable=True)
    uplink: Mapped[str | None] = mapped_column(String(15), nullable=True)
    domain: Mapped[str | None] = mapped_column(String(253), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class PortForward(Base):
    """host_port on the host -> vm_port on a NIC's address (nat networks)."""

    __tablename__ = "port_forwards"
    __table_args__ = (UniqueConstraint("proto", "host_port"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"))
    nic_id: Mapped[int] = mapped_column(ForeignKey("nics.id", ondelete="CASCADE"))
    proto: Mapped[str] = mapped_column(String(3))
    host_port: Mapped[int] = mapped_column(Integer)
    vm_port: Mapped[int] = mapped_column(Integer)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Room for the longest target, "iso:" + a 128-character name.
    target: Mapped[str | None] = mapped_column(String(255), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # The node whose runner runs it (nodes.id): only that node recovers it.
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class JobLog(Base):
    __tablename__ = "job_logs"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    message: Mapped[str] = mapped_column(Text)


class Event(Base):
    """A recorded state transition or notable happening on a VM or the host."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    vm_uuid: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class Setting(Base):
    """Host-wide persistent settings, e.g. pinned machine types."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SnapshotSchedule(Base):
    """Take a snapshot of a VM every `interval_seconds`, keeping the newest `keep` of them."""

    __tablename__ = "snapshot_schedules"
    __table_args__ = (UniqueConstraint("vm_id", "interval_seconds"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    interval_seconds: Mapped[int] = mapped_column(Integer)
    keep: Mapped[int] = mapped_column(Integer)
    with_memory: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Snapshot(Base):
    """One point in time of a VM: the internal qcow2 snapshot `tag` in each of its disks
    (with the RAM and device state in the first disk's when `with_memory`), plus a copy
    of its UEFI variables. The tree (parent, current) is vmhive's own record.

    status: creating | ready | reverting | deleting; the marks let crash recovery
    roll an interrupted operation back (creating) or forward (reverting, deleting).
    """

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("vm_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    tag: Mapped[str] = mapped_column(String(64), unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    schedule_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshot_schedules.id", ondelete="SET NULL"), nullable=True
    )
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    with_memory: Mapped[bool] = mapped_column(Boolean, default=False)
    # The VM's observed state when the snapshot was taken: running | paused | stopped.
    vm_state: Mapped[str] = mapped_column(String(16))
    # The saved RAM and device state plus the UEFI variables copy, in bytes.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # How long the guest's vCPUs stood still for it (None: the VM was not running).
    pause_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="creating")
    # The snapshot the VM's present state descends from: the parent of the next one.
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    # What a revert restores besides the disks: {"vcpus", "memory_mib", "disks": [paths]}
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class User(Base):
    """A web UI login. `password_hash` is `scrypt$N$r$p$salt$hash` (hashlib.scrypt)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class LoginSession(Base):
    """A browser's login. The cookie holds a secret; only its SHA-256 is stored, so a
    copy of the database cannot be replayed as a cookie."""

    __tablename__ = "login_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(cookie) hex
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Node(Base):
    """A host of the cluster (one row on a single host): where it is reached,
    what it has, and when it last said it was alive.

    `incarnation` grows at every start of its daemon, so a node that comes back
    after being declared dead is told apart from the one that went away.
    """

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    address: Mapped[str] = mapped_column(String(255))  # host:port of its API, for other nodes
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    storage_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_free_bytes: Mapped[int] = mapped_column(BigInteger)
    qemu_version: Mapped[str] = mapped_column(String(32), default="")
    accel: Mapped[str] = mapped_column(String(8), default="")
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    incarnation: Mapped[int] = mapped_column(Integer, default=1)
    # The pools it can use (shared ones only when their marker is there); None: unknown.
    pools: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    joined_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
