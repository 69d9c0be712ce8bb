"""The round-robin store: consolidation, gaps, wrap-around, fixed size, persistence."""

from __future__ import annotations

import math

import pytest

from vmhive.metrics.rrd import ArchiveSpec, RoundRobin, archives_for

SMALL = (ArchiveSpec("hour", 5, 4), ArchiveSpec("day", 20, 3))


def test_worked_example_of_the_docstring() -> None:
    rrd = RoundRobin(["x"], [ArchiveSpec("hour", 5, 4)])
    rrd.update(0, [1.0])
    rrd.update(2, [3.0])
    rrd.update(5, [4.0])
    rrd.update(17, [6.0])
    step, timestamps, series = rrd.fetch("hour", now=17)
    assert (step, timestamps) == (5, [0, 5, 10, 15])
    assert series["x"] == [2.0, 4.0, None, 6.0]
    rrd.update(25, [1.0])
    _, timestamps, series = rrd.fetch("hour", now=25)
    assert timestamps == [10, 15, 20, 25]
    assert series["x"] == [None, 6.0, None, 1.0]


def test_coarser_archive_averages_every_sample_of_its_step() -> None:
    rrd = RoundRobin(["a", "b"], SMALL)
    for t in range(0, 60, 5):  # 12 samples: a = t, b = 10
        rrd.update(t, [float(t), 10.0])
    _, timestamps, series = rrd.fetch("day", now=59)
    assert timestamps == [0, 20, 40]
    assert series["a"] == [7.5, 27.5, 47.5]  # means of 0..15, 20..35, 40..55
    assert series["b"] == [10.0, 10.0, 10.0]
    # The fine archive holds only its last 4 buckets.
    _, timestamps, series = rrd.fetch("hour", now=59)
    assert timestamps == [40, 45, 50, 55]
    assert series["a"] == [40.0, 45.0, 50.0, 55.0]


def test_nan_values_are_left_out_of_the_average_and_read_as_none() -> None:
    rrd = RoundRobin(["a", "b"], SMALL)
    rrd.update(0, [1.0, math.nan])
    rrd.update(10, [3.0, math.nan])
    rrd.update(20, [math.nan, math.nan])
    _, _, series = rrd.fetch("day", now=20)
    assert series["a"][-2:] == [2.0, None]
    assert series["b"][-2:] == [None, None]


def test_a_long_silence_empties_the_window() -> None:
    rrd = RoundRobin(["a"], SMALL)
    rrd.update(0, [1.0])
    rrd.update(5, [2.0])
    rrd.update(1000, [3.0])  # far more than `rows` buckets later
    _, timestamps, series = rrd.fetch("hour", now=1000)
    assert timestamps == [985, 990, 995, 1000]
    assert series["a"] == [None, None, None, 3.0]
    # A query later than the last sample shows the time since as gaps.
    _, _, series = rrd.fetch("hour", now=1010)
    assert series["a"] == [None, 3.0, None, None]


def test_wrap_around_keeps_exactly_the_last_rows() -> None:
    rrd = RoundRobin(["a"], SMALL)
    for i in range(100):
        rrd.update(i * 5, [float(i)])
    _, timestamps, series = rrd.fetch("hour", now=99 * 5)
    assert timestamps == [480, 485, 490, 495]
    assert series["a"] == [96.0, 97.0, 98.0, 99.0]


def test_a_sample_from_the_past_is_ignored() -> None:
    rrd = RoundRobin(["a"], SMALL)
    rrd.update(100, [1.0])
    rrd.update(50, [1000.0])  # the wall clock went back
    _, _, series = rrd.fetch("hour", now=100)
    assert series["a"][-1] == 1.0


def test_size_is_fixed_however_long_it_runs() -> None:
    rrd = RoundRobin(["a", "b", "c"], archives_for(5))
    size = rrd.nbytes
    assert size == 3 * (720 + 1440 + 1008) * 4
    for i in range(20_000):  # 27 hours of 5 s samples
        rrd.update(i * 5, [1.0, 2.0, 3.0])
    assert rrd.nbytes == size
    assert [len(a.values) for a in rrd.archives] == [3 * 720, 3 * 1440, 3 * 1008]
    step, timestamps, series = rrd.fetch("week", now=19_999 * 5)
    assert step == 600 and len(timestamps) == 1008 and len(series["c"]) == 1008
    assert {v for v in series["c"] if v is not None} == {3.0}


def test_wrong_row_width_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 2 values"):
        RoundRobin(["a", "b"], SMALL).update(0, [1.0])


def test_steps_follow_a_long_interval() -> None:
    assert [(a.step, a.rows) for a in archives_for(5)] == [(5, 720), (60, 1440), (600, 1008)]
    assert [(a.step, a.rows) for a in archives_for(1)] == [(5, 720), (60, 1440), (600, 1008)]
    assert [(a.step, a.rows) for a in archives_for(30)] == [(30, 120), (60, 1440), (600, 1008)]


def test_persistence_round_trip_keeps_rings_and_buckets_in_progress() -> None:
    rrd = RoundRobin(["a", "b"], SMALL)
    for t in range(0, 47, 3):
        rrd.update(t, [t * 1.5, math.nan if t % 2 else 1.0])
    loaded = RoundRobin.load(rrd.dump(), ["a", "b"], SMALL)
    assert loaded is not None
    for name in ("hour", "day"):
        assert loaded.fetch(name, now=46) == rrd.fetch(name, now=46)
    # Both go on the same way after the reload.
    rrd.update(50, [2.0, 2.0])
    loaded.update(50, [2.0, 2.0])
    assert loaded.fetch("day", now=50) == rrd.fetch("day", now=50)
    assert loaded.last_update == 50


def test_load_refuses_another_layout_or_damaged_data() -> None:
    rrd = RoundRobin(["a"], SMALL)
    rrd.update(0, [1.0])
    data = rrd.dump()
    assert RoundRobin.load(data, ["b"], SMALL) is None
    assert RoundRobin.load(data, ["a"], (ArchiveSpec("hour", 5, 5), SMALL[1])) is None
    assert RoundRobin.load(data[:-10], ["a"], SMALL) is None
    assert RoundRobin.load(b"garbage", ["a"], SMALL) is None
    assert RoundRobin.load(data[:20], ["a"], SMALL) is None
