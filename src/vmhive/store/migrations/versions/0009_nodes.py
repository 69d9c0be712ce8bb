"""nodes of a cluster, and which node owns each VM

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("storage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("qemu_version", sa.String(length=32), nullable=False),
        sa.Column("accel", sa.String(length=8), nullable=False),
        sa.Column("drained", sa.Boolean(), nullable=False),
        sa.Column("incarnation", sa.Integer(), nullable=False),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    # Plain columns (no foreign key): SQLite adds them without rebuilding `vms`,
    # whose rebuild would cascade-delete every disk and NIC row.
    op.add_column("vms", sa.Column("node_id", sa.Integer(), nullable=True))
    op.add_column("vms", sa.Column("affinity_group", sa.String(length=64), nullable=True))
    op.create_index("ix_vms_node_id", "vms", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_vms_node_id", table_name="vms")
    op.drop_column("vms", "affinity_group")
    op.drop_column("vms", "node_id")
    op.drop_table("nodes")
