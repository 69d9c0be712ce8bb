"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, always handed back timezone-aware in UTC.

    PostgreSQL's `timestamptz` returns aware values; SQLite keeps no zone and
    returns naive ones (which are UTC here, since values are converted to UTC on
    the way in). Without this the API would say `...T12:00:00` on one store and
    `...T12:00:00Z` on the other, and a browser reads the former as local time.
    The DDL is plain `DateTime(timezone=True)`, so existing schemas are unchanged.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
