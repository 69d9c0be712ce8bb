"""Live migration of a running guest between two QEMU processes (see engine.py)."""

from vmhive.hypervisor.qemu.migration.engine import EventFeed, LiveMigration, plan_local_disks
from vmhive.hypervisor.qemu.migration.model import (
    Endpoint,
    MigrationCancelled,
    MigrationError,
    MigrationProgress,
    MigrationSettings,
    MigrationStats,
    MirrorProgress,
    StorageMode,
    incoming_argv,
    target_spec,
)
from vmhive.hypervisor.qemu.migration.target import MigrationTarget, NewDisk

__all__ = [
    "Endpoint",
    "EventFeed",
    "LiveMigration",
    "MigrationCancelled",
    "MigrationError",
    "MigrationProgress",
    "MigrationSettings",
    "MigrationStats",
    "MigrationTarget",
    "MirrorProgress",
    "NewDisk",
    "StorageMode",
    "incoming_argv",
    "plan_local_disks",
    "target_spec",
]
