"""templates and linked clones

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 09:21:11.742695
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_disk_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_disks_base_disk_id_disks", "disks", ["base_disk_id"], ["id"], ondelete="RESTRICT"
        )

    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_template", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("is_template")

    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.drop_constraint("fk_disks_base_disk_id_disks", type_="foreignkey")
        batch_op.drop_column("base_disk_id")
