"""cloud-init settings as one document

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cloudinit_config", sa.JSON(), nullable=True))
    vms = sa.table(
        "vms",
        sa.column("id", sa.Integer),
        sa.column("cloudinit_user_data", sa.Text),
        sa.column("cloudinit_config", sa.JSON),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(vms.c.id, vms.c.cloudinit_user_data).where(vms.c.cloudinit_user_data.is_not(None))
    ).all()
    for vm_id, user_data in rows:
        bind.execute(
            vms.update().where(vms.c.id == vm_id).values(cloudinit_config={"user_data": user_data})
        )
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("cloudinit_user_data")


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cloudinit_user_data", sa.Text(), nullable=True))
        batch_op.drop_column("cloudinit_config")
