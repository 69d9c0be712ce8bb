"""which node runs each job

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 15:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("node_id", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_node_id", "jobs", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_node_id", table_name="jobs")
    op.drop_column("jobs", "node_id")
