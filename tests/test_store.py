"""The readings table, clustered by hour (headend/store.py): what a meter's
queries return, which rows they read, and the upgrade of a store made
before the hour column existed."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from headend.store import Store
from shared import obis

T0 = 1_767_225_600  # 2026-01-01 00:00 UTC


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "store.db")
    s.add_dap(1, "aggregate")
    s.add_meters([(m, bytes([m]) * 32, 1, 1, 900) for m in (1, 2, 3)])
    yield s
    s.close()


def _put(store: Store, rows: list[tuple]) -> int:
    store.stage_readings(rows)
    with store.transaction() as db:
        return store.add_staged_readings(db)


def _random_rows(rng: random.Random, n: int) -> list[tuple]:
    """n distinct (meter, quantity, start, value, quality, received_at,
    request) rows over three days, some on hour boundaries."""
    keys = set()
    while len(keys) < n:
        start = T0 + rng.choice([rng.randrange(3 * 86400), 3600 * rng.randrange(72)])
        keys.add((rng.choice((1, 2, 3)), rng.choice(sorted(obis.CODES)), start))
    return [(m, q, s, rng.randrange(10**6), rng.choice((0, 0, 4)), 1.0, rng.randrange(9))
            for m, q, s in sorted(keys)]


def test_a_meters_readings_are_exactly_those_in_its_range(store: Store) -> None:
    rng = random.Random(7)
    rows = _random_rows(rng, 3000)
    assert _put(store, rows) == len(rows)
    assert _put(store, rows[:100]) == 0  # stored already: the primary key holds
    ranges = [(0, 2**62), (T0 + 3600, T0 + 7200), (T0 + 3599, T0 + 3601), (T0 + 5, T0 + 5),
              (T0 - 86400, T0 + 1)]
    ranges += [tuple(sorted((T0 + rng.randrange(-3600, 4 * 86400),
                             T0 + rng.randrange(-3600, 4 * 86400)))) for _ in range(40)]
    for meter in (1, 2, 3, 4):
        for lo, hi in ranges:
            mine = [r for r in rows if r[0] == meter and lo <= r[2] < hi]
            want_all = sorted((q, s, v, ql, req) for _, q, s, v, ql, _, req in mine)
            assert store.readings(meter, None, lo, hi) == want_all
            q = obis.INTERVAL_IMPORT
            assert store.readings(meter, q, lo, hi) == [r for r in want_all if r[0] == q]
            assert store.interval_starts(meter, lo, hi) == [r[1] for r in want_all if r[0] == q]


def test_latest_is_the_last_reading_of_that_quantity(store: Store) -> None:
    assert store.latest(1, obis.ENERGY_IMPORT) is None  # nothing stored at all
    rows = _random_rows(random.Random(3), 500)
    _put(store, rows)
    for meter in (1, 2, 3, 4):
        for q in obis.CODES:
            mine = [(s, v) for m, qq, s, v, *_ in rows if m == meter and qq == q]
            assert store.latest(meter, q) == (max(mine) if mine else None)


def test_a_meters_query_seeks_its_hours_and_scans_nothing(store: Store) -> None:
    """The plan of every query a meter's readings take: steps from one hour
    held to the next (each a seek on the primary key), and one seek on
    (hour, meter) per hour; never a scan of the readings table."""
    _put(store, _random_rows(random.Random(1), 200))
    plans = []
    real = store.db.execute

    def spy(sql, params=()):
        if "readings" in sql and not sql.startswith(("INSERT", "DELETE")):
            plans.append(" / ".join(r[3] for r in real("EXPLAIN QUERY PLAN " + sql, params)))
        return real(sql, params)

    store.db = type("Spy", (), {"execute": staticmethod(spy)})()
    try:
        store.readings(2, None, T0, T0 + 86400)
        store.readings(2, obis.ENERGY_IMPORT, T0, T0 + 86400)
        store.interval_starts(2, T0, T0 + 86400)
        store.latest(2, obis.ENERGY_IMPORT)
    finally:
        store.db = real.__self__
    assert len(plans) == 5, plans  # latest() takes two
    for plan in plans:
        assert "SCAN r " not in plan + " " and "SCAN readings" not in plan, plan
        assert "USING PRIMARY KEY (hour=? AND meter=?" in plan, plan


def _steps(store: Store, call) -> int:
    """SQLite virtual-machine steps (in thousands) that call() takes."""
    n = [0]

    def tick() -> int:
        n[0] += 1
        return 0

    store.db.set_progress_handler(tick, 1000)
    try:
        call()
    finally:
        store.db.set_progress_handler(None, 1000)
    return n[0]


def test_hours_without_readings_cost_nothing(store: Store) -> None:
    """A meter whose clock once said 1970 leaves a reading 56 years (490,000
    hours) before the rest. A meter's queries step from one hour that holds
    readings to the next, so that gap costs one step, not one per hour."""
    rows = [(m, obis.ENERGY_IMPORT, T0 + 900 * i, i, 0, 1.0, 1) for m in (1, 2) for i in range(8)]
    _put(store, rows)
    before = _steps(store, lambda: store.readings(1))
    _put(store, [(3, obis.ENERGY_IMPORT, 5, 1, 0, 1.0, 1)])  # 1970-01-01 00:00:05
    calls = {
        "readings": lambda: store.readings(1),
        "interval starts": lambda: store.interval_starts(1, 0, 2**40),
        "latest": lambda: store.latest(3, obis.ENERGY_IMPORT),
    }
    for what, call in calls.items():
        assert _steps(store, call) <= before + 2, what
    assert store.readings(3) == [(obis.ENERGY_IMPORT, 5, 1, 0, 1)]
    assert store.latest(3, obis.ENERGY_IMPORT) == (5, 1)
    assert store.latest(1, obis.ENERGY_IMPORT) == (T0 + 900 * 7, 7)


def test_latest_stops_at_the_newest_hour_that_has_it(store: Store) -> None:
    """latest() walks down from the newest hour and stops at the first that
    holds the meter's reading: 5,000 hours of history cost nothing then,
    and all of them when the meter has no such reading at all."""
    _put(store, [(1, obis.ENERGY_IMPORT, T0 + 3600 * h, h, 0, 1.0, 1) for h in range(5000)])
    _put(store, [(2, obis.ENERGY_IMPORT, T0 + 3600 * 4999 + 7, 9, 0, 1.0, 1)])
    assert _steps(store, lambda: store.latest(2, obis.ENERGY_IMPORT)) <= 1
    assert _steps(store, lambda: store.latest(1, obis.ENERGY_IMPORT)) <= 1
    assert _steps(store, lambda: store.latest(3, obis.ENERGY_IMPORT)) >= 20  # walks them all
    assert store.latest(1, obis.ENERGY_IMPORT) == (T0 + 3600 * 4999, 4999)
    assert store.latest(3, obis.ENERGY_IMPORT) is None


OLD_SCHEMA = """
CREATE TABLE quantities (tag INTEGER PRIMARY KEY, obis TEXT NOT NULL UNIQUE, unit TEXT NOT NULL);
CREATE TABLE readings (
    meter INTEGER NOT NULL, quantity INTEGER NOT NULL REFERENCES quantities(tag),
    start INTEGER NOT NULL, value INTEGER NOT NULL, quality INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL, request INTEGER, PRIMARY KEY (meter, start, quantity)
) WITHOUT ROWID;
"""  # the readings table as stores made before the hour clustering hold it
# and the statement that version stored readings with
OLD_INSERT = ("INSERT OR IGNORE INTO readings (meter, quantity, start, value, quality, "
              "received_at, request) VALUES (?, ?, ?, ?, ?, ?, ?)")


def test_a_store_from_before_the_hour_column_is_upgraded_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    rows = _random_rows(random.Random(5), 400)
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.executemany("INSERT INTO quantities VALUES (?, ?, ?)",
                    [(t, code, unit) for t, (code, unit) in obis.CODES.items()])
    old.executemany(OLD_INSERT, rows)
    old.commit()
    s = Store(path)
    try:
        kinds = dict(s.db.execute("SELECT name, type FROM sqlite_master "
                                  "WHERE name IN ('readings', 'readings_by_hour')"))
        assert kinds == {"readings": "view", "readings_by_hour": "table"}
        assert s.reading_count() == len(rows)
        assert sorted(s.db.execute("SELECT * FROM readings")) == sorted(rows)
        for meter in (1, 2, 3):
            want = sorted((q, st, v, ql, req) for m, q, st, v, ql, _, req in rows if m == meter)
            assert s.readings(meter) == want
        assert _put(s, rows[:10]) == 0  # the primary key came across
    finally:
        s.close()
    # A head-end of the earlier version still running on the upgraded store
    # fails loudly on its next insert: it stores, and so acknowledges,
    # nothing (before the view, its INSERT OR IGNORE skipped every row)
    with pytest.raises(sqlite3.OperationalError, match="it is a view"):
        old.execute(OLD_INSERT, (1, obis.ENERGY_IMPORT, T0 - 3600, 1, 0, 1.0, 1))
    old.close()
    again = Store(path)  # opening it again changes nothing
    try:
        assert again.reading_count() == len(rows)
    finally:
        again.close()


def test_the_hour_column_must_match_the_start(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("INSERT INTO readings_by_hour (hour, meter, quantity, start, value, "
                         "received_at) VALUES (1, 1, 1, ?, 5, 0)", (T0,))
