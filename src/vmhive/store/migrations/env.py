"""Alembic environment: runs migrations with a synchronous engine."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from vmhive.store.models import Base

# Any constant: the key of the PostgreSQL advisory lock that migrations hold.
MIGRATION_LOCK_KEY = 0x766D68697665  # "vmhive"

config = context.config
connectable = engine_from_config(
    config.get_section(config.config_ini_section) or {},
    prefix="sqlalchemy.",
    poolclass=pool.NullPool,
)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Hosts of a cluster share one database and may start together: one
            # migrates while the others wait, then find the schema at head. The
            # lock ends with the transaction (PostgreSQL's DDL is transactional).
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        context.run_migrations()
