"""Snapshot policy: names, schedule periods, run times and retention. Pure functions.

A period is a count and a unit (``30s``, ``15m``, ``1h``, ``1d``, ``1w``) or a
name (``hourly``, ``daily``, ``weekly``). Runs fall on whole multiples of the
period counted from Monday 1970-01-05 00:00 UTC, whenever the schedule was
made, as cron would place them: an hourly schedule runs on the hour, a daily
one at midnight UTC, a weekly one on Mondays at midnight UTC.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from vmhive.services.errors import InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAMED_PERIODS = {"hourly": 3600, "daily": 86400, "weekly": 604800}
UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
MIN_PERIOD = 5
MAX_PERIOD = 366 * 86400
MAX_KEEP = 1000
# A Monday: weekly runs fall on Mondays, daily ones at midnight UTC.
ORIGIN = datetime(1970, 1, 5, tzinfo=UTC)
SCHEDULED_PREFIX = "auto-"


def check_name(name: str) -> None:
    """Snapshot names: 1-63 letters, digits, '.', '_' or '-', not starting with a symbol."""
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid snapshot name {name!r}: use 1-63 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )


def parse_period(text: str) -> int:
    """Seconds in a period.

    >>> parse_period("1h"), parse_period("90m"), parse_period("daily"), parse_period("2w")
    (3600, 5400, 86400, 1209600)
    """
    value = text.strip().lower()
    if value in NAMED_PERIODS:
        return NAMED_PERIODS[value]
    match = re.fullmatch(r"(\d{1,7})\s*([smhdw])", value)
    if not match:
        raise InvalidRequest(
            f"invalid period {text!r}: use e.g. 30s, 15m, 1h, 1d, 1w, hourly, daily or weekly"
        )
    seconds = int(match.group(1)) * UNITS[match.group(2)]
    if not MIN_PERIOD <= seconds <= MAX_PERIOD:
        raise InvalidRequest(f"a period must be between {MIN_PERIOD} s and 366 days, got {text!r}")
    return seconds


def format_period(seconds: int) -> str:
    """The shortest spelling of a period in one unit.

    >>> format_period(3600), format_period(5400), format_period(604800), format_period(45)
    ('1h', '90m', '1w', '45s')
    """
    for unit, size in UNITS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"  # unreachable: every whole number of seconds divides by 1


def check_keep(keep: int) -> None:
    if not 1 <= keep <= MAX_KEEP:
        raise InvalidRequest(f"--keep must be between 1 and {MAX_KEEP}, got {keep}")


def next_run(after: datetime, period: int) -> datetime:
    """The first run time strictly after `after`.

    >>> at = datetime(2026, 11, 28, 11, 40, 7, tzinfo=UTC)  # a Saturday
    >>> next_run(at, 3600).isoformat()
    '2026-11-28T12:00:00+00:00'
    >>> next_run(at, 86400).isoformat()
    '2026-11-29T00:00:00+00:00'
    >>> next_run(at, 604800).isoformat()  # the next Monday
    '2026-11-30T00:00:00+00:00'
    >>> next_run(datetime(2026, 11, 28, 12, 0, tzinfo=UTC), 3600).isoformat()
    '2026-11-28T13:00:00+00:00'
    """
    elapsed = (after - ORIGIN).total_seconds()
    return ORIGIN + timedelta(seconds=(math.floor(elapsed / period) + 1) * period)


def expired(snapshots: Sequence[tuple[int, datetime]], keep: int) -> list[int]:
    """Ids of the snapshots (id, created_at) beyond the newest `keep`, oldest first.

    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> expired([(1, t), (3, t + timedelta(hours=2)), (2, t + timedelta(hours=1))], 2)
    [1]
    >>> expired([(1, t)], 3)
    []
    """
    ordered = sorted(snapshots, key=lambda item: (item[1], item[0]))
    return [snapshot_id for snapshot_id, _ in ordered[: max(0, len(ordered) - keep)]]


def scheduled_name(period: int, at: datetime) -> str:
    """The name of a scheduled snapshot.

    >>> scheduled_name(3600, datetime(2026, 11, 28, 12, 0, 3, tzinfo=UTC))
    'auto-1h-20261128-120003'
    """
    return f"{SCHEDULED_PREFIX}{format_period(period)}-{at.astimezone(UTC):%Y%m%d-%H%M%S}"
