"""cloud-init

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:30:15.353393
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cloudinit", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("cloudinit_instance_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cloudinit_user_data", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("cloudinit_user_data")
        batch_op.drop_column("cloudinit_instance_id")
        batch_op.drop_column("cloudinit")
