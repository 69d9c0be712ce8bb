"""shared pools, the node that holds each local volume, and the pools each node sees

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "pools", sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("pools", sa.Column("marker", sa.String(length=36), nullable=True))
    op.add_column("volumes", sa.Column("node_id", sa.Integer(), nullable=True))
    op.create_index("ix_volumes_node_id", "volumes", ["node_id"])
    op.add_column("nodes", sa.Column("pools", sa.JSON(), nullable=True))
    # Volumes made before: on the node of a single-host database (the only one).
    op.execute("UPDATE volumes SET node_id = (SELECT MIN(id) FROM nodes)")


def downgrade() -> None:
    op.drop_column("nodes", "pools")
    op.drop_index("ix_volumes_node_id", table_name="volumes")
    op.drop_column("volumes", "node_id")
    op.drop_column("pools", "marker")
    op.drop_column("pools", "shared")
