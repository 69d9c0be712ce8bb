"""virtual switches: networks, NICs on them, port forwards

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        # 63 (was 32): network names may be that long, and PostgreSQL enforces the
        # length. SQLite does not, so databases made with 32 behave the same.
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("bridge", sa.String(length=15), nullable=False),
        sa.Column("subnet", sa.String(length=18), nullable=True),
        sa.Column("gateway", sa.String(length=15), nullable=True),
        sa.Column("dhcp_start", sa.String(length=15), nullable=True),
        sa.Column("dhcp_end", sa.String(length=15), nullable=True),
        sa.Column("uplink", sa.String(length=15), nullable=True),
        sa.Column("domain", sa.String(length=253), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("bridge"),
    )
    with op.batch_alter_table("nics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("network_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ip", sa.String(length=15), nullable=True))
        batch_op.add_column(sa.Column("vlan", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("link_up", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.create_foreign_key(
            "fk_nics_network_id", "networks", ["network_id"], ["id"], ondelete="RESTRICT"
        )
    op.create_table(
        "port_forwards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("nic_id", sa.Integer(), nullable=False),
        sa.Column("proto", sa.String(length=3), nullable=False),
        sa.Column("host_port", sa.Integer(), nullable=False),
        sa.Column("vm_port", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["network_id"], ["networks.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["nic_id"], ["nics.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("proto", "host_port"),
    )


def downgrade() -> None:
    op.drop_table("port_forwards")
    with op.batch_alter_table("nics", schema=None) as batch_op:
        batch_op.drop_constraint("fk_nics_network_id", type_="foreignkey")
        batch_op.drop_column("link_up")
        batch_op.drop_column("vlan")
        batch_op.drop_column("ip")
        batch_op.drop_column("network_id")
    op.drop_table("networks")
