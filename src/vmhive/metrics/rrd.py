"""A bounded multi-resolution round-robin store, as RRDtool keeps one.

A `RoundRobin` holds the fields of one source (a VM's cpu_percent,
memory_bytes, ...) in a few archives of fixed size. Each archive averages the
samples that fall into one of its steps (a *bucket*: ``int(t // step)``) and
keeps the last `rows` buckets in a ring:

    archive   step    rows   covers
    hour       5 s     720   1 hour
    day       60 s    1440   1 day
    week     600 s    1008   1 week

Memory is fixed when the store is made (rows x fields float32 values per
archive, about 100 KB for a VM's 8 fields), however long the daemon runs.
Every archive is fed the raw samples directly, so a day bucket is the average
of the samples of its minute, not an average of averages.

Worked example, one field, step 5, 4 rows:

    update(0, 1.0); update(2, 3.0)   bucket 0 in progress: sum 4, count 2
    update(5, 4.0)                   bucket 0 written: 2.0; bucket 1 in progress
    update(17, 6.0)                  bucket 1 written: 4.0; bucket 2 (no sample)
                                     written NaN (a gap); bucket 3 in progress
    fetch(end=3) -> buckets 0..3:    [2.0, 4.0, None, 6.0]
    update(25, 1.0)                  bucket 3 written: 6.0; bucket 4 (no sample)
                                     NaN into bucket 0's slot; bucket 5 in
                                     progress, in bucket 1's slot
    fetch(end=5) -> buckets 2..5:    [None, 6.0, None, 1.0]

A sample older than an archive's bucket in progress (the wall clock went
back) is ignored by that archive. NaN in a sample means "unknown" and is left
out of the average; a bucket without any known value reads as None.

The binary form (`dump` / `load`) is a JSON header line (fields, archives,
buckets in progress) followed by each archive's ring as raw float32s.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

NAN = float("nan")
TYPECODE = "f"  # float32: 7 significant digits are more than a chart can show
MAGIC = b"vmhive-rrd 1\n"


@dataclass(frozen=True)
class ArchiveSpec:
    name: str
    step: int  # seconds per bucket
    rows: int  # buckets kept

    @property
    def span(self) -> int:
        return self.step * self.rows


#: What each range shows and at which step, before `archives_for` adapts the step.
RANGES: tuple[ArchiveSpec, ...] = (
    ArchiveSpec("hour", 5, 720),
    ArchiveSpec("day", 60, 1440),
    ArchiveSpec("week", 600, 1008),
)


def archives_for(interval: float) -> tuple[ArchiveSpec, ...]:
    """The archives for a sampling interval: a step shorter than the interval
    would leave every other bucket empty, so it grows to the interval (the span
    stays the same, with fewer rows).

    >>> [a.step for a in archives_for(5)], [a.rows for a in archives_for(12)]
    ([5, 60, 600], [300, 1440, 1008])
    """
    out = []
    for spec in RANGES:
        step = max(spec.step, math.ceil(interval))
        out.append(ArchiveSpec(spec.name, step, spec.span // step))
    return tuple(out)


class _Archive:
    def __init__(self, spec: ArchiveSpec, nfields: int) -> None:
        self.spec = spec
        self.nfields = nfields
        self.values = array(TYPECODE, [NAN]) * (spec.rows * nfields)
        self.bucket: int | None = None  # the bucket in progress
        self.sums = [0.0] * nfields
        self.counts = [0] * nfields

    def add(self, t: float, row: Sequence[float]) -> None:
        bucket = int(t // self.spec.step)
        if self.bucket is None:
            self.bucket = bucket
        elif bucket < self.bucket:
            return
        elif bucket > self.bucket:
            self._close(bucket)
        for i, value in enumerate(row):
            if not math.isnan(value):
                self.sums[i] += value
                self.counts[i] += 1

    def _close(self, new_bucket: int) -> None:
        """Write the bucket in progress, NaN into the skipped ones, start `new_bucket`."""
        assert self.bucket is not None
        rows, nf = self.spec.rows, self.nfields
        self._write(self.bucket, self.partial())
        skipped = new_bucket - self.bucket - 1
        if skipped >= rows:
            self.values = array(TYPECODE, [NAN]) * (rows * nf)
        else:
            gap = array(TYPECODE, [NAN]) * nf
            for bucket in range(self.bucket + 1, new_bucket):
                self._write(bucket, gap)
        self.bucket = new_bucket
        self.sums = [0.0] * nf
        self.counts = [0] * nf

    def _write(self, bucket: int, row: Sequence[float]) -> None:
        start = (bucket % self.spec.rows) * self.nfields
        self.values[start : start + self.nfields] = array(TYPECODE, row)

    def partial(self) -> list[float]:
        """The average so far of the bucket in progress (NaN where nothing came)."""
        return [s / c if c else NAN for s, c in zip(self.sums, self.counts, strict=True)]

    def column(self, field: int, end: int) -> list[float]:
        """Field `field` over the `rows` buckets ending with bucket `end`."""
        rows = self.spec.rows
        out = [NAN] * rows
        if self.bucket is None:
            return out
        current = self.bucket
        ring = self.values[field :: self.nfields]
        partial = array(TYPECODE, self.partial())[field]  # as it will be stored
        start = end - rows + 1
        for i in range(rows):
            bucket = start + i
            if bucket == current:
                out[i] = partial
            elif current - rows < bucket < current:
                out[i] = ring[bucket % rows]
        return out


class RoundRobin:
    """The fixed-size history of one source's fields; see the module docstring."""

    def __init__(self, fields: Sequence[str], archives: Sequence[ArchiveSpec]) -> None:
        self.fields = tuple(fields)
        self.archives = tuple(_Archive(spec, len(self.fields)) for spec in archives)
        self.last_update: float | None = None

    def update(self, t: float, row: Sequence[float]) -> None:
        """Add one sample: a value per field (NaN: unknown) taken at unix time `t`."""
        if len(row) != len(self.fields):
            raise ValueError(f"expected {len(self.fields)} values, got {len(row)}")
        for archive in self.archives:
            archive.add(t, row)
        self.last_update = t if self.last_update is None else max(self.last_update, t)

    def archive(self, name: str) -> ArchiveSpec:
        for archive in self.archives:
            if archive.spec.name == name:
                return archive.spec
        raise KeyError(name)

    def fetch(self, name: str, now: float) -> tuple[int, list[int], dict[str, list[float | None]]]:
        """Archive `name` over the window ending with the bucket of `now`:
        (step, bucket start times, values per field with None for gaps)."""
        archive = next(a for a in self.archives if a.spec.name == name)
        step, rows = archive.spec.step, archive.spec.rows
        end = int(now // step)
        timestamps = [(end - rows + 1 + i) * step for i in range(rows)]
        series = {
            field: [_json_value(v) for v in archive.column(i, end)]
            for i, field in enumerate(self.fields)
        }
        return step, timestamps, series

    @property
    def nbytes(self) -> int:
        """Bytes held by the rings (what grows with the number of sources)."""
        return sum(a.values.itemsize * len(a.values) for a in self.archives)

    # -- persistence ----------------------------------------------------------

    def dump(self) -> bytes:
        header = {
            "byteorder": sys.byteorder,
            "typecode": TYPECODE,
            "fields": list(self.fields),
            "last_update": self.last_update,
            "archives": [
                {
                    "name": a.spec.name,
                    "step": a.spec.step,
                    "rows": a.spec.rows,
                    "bucket": a.bucket,
                    "sums": a.sums,
                    "counts": a.counts,
                }
                for a in self.archives
            ],
        }
        parts = [MAGIC, json.dumps(header).encode(), b"\n"]
        parts += [a.values.tobytes() for a in self.archives]
        return b"".join(parts)

    @classmethod
    def load(
        cls, data: bytes, fields: Sequence[str], archives: Sequence[ArchiveSpec]
    ) -> RoundRobin | None:
        """The store `dump` wrote, or None if it is damaged or laid out differently
        from `fields` and `archives` (then history starts afresh)."""
        store = cls(fields, archives)
        if not data.startswith(MAGIC):
            return None
        head_end = data.find(b"\n", len(MAGIC))
        try:
            header = json.loads(data[len(MAGIC) : head_end])
            layout = [(a["name"], a["step"], a["rows"]) for a in header["archives"]]
        except (ValueError, KeyError, TypeError):
            return None
        wanted = [(a.spec.name, a.spec.step, a.spec.rows) for a in store.archives]
        if (
            head_end < 0
            or header.get("byteorder") != sys.byteorder
            or header.get("typecode") != TYPECODE
            or header.get("fields") != list(store.fields)
            or layout != wanted
        ):
            return None
        offset = head_end + 1
        for archive, saved in zip(store.archives, header["archives"], strict=True):
            size = len(archive.values) * archive.values.itemsize
            chunk = data[offset : offset + size]
            if len(chunk) != size:
                return None
            archive.values = array(TYPECODE, chunk)
            archive.bucket = saved["bucket"]
            archive.sums = [float(v) for v in saved["sums"]]
            archive.counts = [int(v) for v in saved["counts"]]
            offset += size
        store.last_update = header.get("last_update")
        return store


def _json_value(value: float) -> float | None:
    """None for a gap; 9 significant digits, exactly what float32 holds, so the
    JSON stays short (25.0000019, not 25.000001907348633)."""
    if math.isnan(value):
        return None
    return float(f"{value:.9g}")
