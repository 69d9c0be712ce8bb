"""pools and volumes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:07:27.560103
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("virtual_size", sa.BigInteger(), nullable=False),
        sa.Column("backing_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["backing_id"], ["volumes.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
        sa.UniqueConstraint("pool_id", "name"),
    )
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("volume_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_disks_volume_id_volumes", "volumes", ["volume_id"], ["id"], ondelete="RESTRICT"
        )


def downgrade() -> None:
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.drop_constraint("fk_disks_volume_id_volumes", type_="foreignkey")
        batch_op.drop_column("volume_id")

    op.drop_table("volumes")
    op.drop_table("pools")
