"""The meter data store: SQLite in WAL mode.

One file holds the registry (meters, DAPs), the readings, the request log,
the replay state of every meter's channel and the head-end's sequences.
Readings have one row per (meter, OBIS quantity, interval start); the
primary key is what makes a redelivered reading a no-op.

Readings are clustered by the hour they belong to, then by meter: the
table readings_by_hour has the primary key (hour, meter, start, quantity),
and `readings` is a view of it without the hour. A batch from many meters
then writes to the few pages of the hours it covers. Clustered by meter
first, every batch wrote one page (or more) per meter in it, however few
rows each meter had, and a meter's rows spread over more pages as its
history grew: ingest got slower as the store aged (make bench,
ingest_vs_raw_open, measures a store that already holds history). One
meter's readings are found by seeking (hour, meter) in each hour of the
range asked for that holds any reading (_HOURS).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path

from shared import obis

log = logging.getLogger("headend.store")

# A reading's hour, the readings' clustering (module docstring): in seconds,
# and as SQL over a row's start.
HOUR = 3600
_HOUR_OF = f"start / {HOUR}"

READINGS = f"""
CREATE TABLE IF NOT EXISTS readings_by_hour (
    hour        INTEGER NOT NULL,        -- {_HOUR_OF}
    meter       INTEGER NOT NULL,
    quantity    INTEGER NOT NULL,        -- a tag of the quantities table (no REFERENCES: below)
    start       INTEGER NOT NULL,
    value       INTEGER NOT NULL,
    quality     INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    request     INTEGER,
    PRIMARY KEY (hour, meter, start, quantity),
    CHECK (hour = {_HOUR_OF})
) WITHOUT ROWID
"""
# `readings` is a view of it in the shape the table had before the hour
# column (module docstring): what ad-hoc SQL reads. A head-end of that
# older version still running on an upgraded store fails on its first
# insert ("cannot modify readings because it is a view"), so it stores and
# acknowledges nothing: its messages wait for the upgraded version. Had
# `readings` stayed a table with a NOT NULL hour, that version's INSERT OR
# IGNORE would have skipped every row without an error, and acknowledged
# the envelopes as duplicates.
READINGS_VIEW = """
CREATE VIEW IF NOT EXISTS readings AS
SELECT meter, quantity, start, value, quality, received_at, request FROM readings_by_hour
"""
# Ingest admits only the quantity tags of shared.obis.CODES (the protocol's
# checks, shared/messages.py), and those are the quantities table. A foreign
# key would look each new reading up in that table again: about 1 us of an
# envelope's 22 (make bench, ingest_vs_raw_open).

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS quantities (
    tag     INTEGER PRIMARY KEY,
    obis    TEXT NOT NULL UNIQUE,
    unit    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS daps (
    dap      INTEGER PRIMARY KEY,
    mode     TEXT NOT NULL CHECK (mode IN ('aggregate', 'router')),
    operator TEXT NOT NULL DEFAULT 'utility'
);
CREATE TABLE IF NOT EXISTS meters (
    meter        INTEGER PRIMARY KEY,
    public_key   BLOB NOT NULL CHECK (length(public_key) = 32),
    dap          INTEGER REFERENCES daps(dap),
    grp          INTEGER,
    period       INTEGER NOT NULL DEFAULT 900,
    session      INTEGER,
    online       INTEGER NOT NULL DEFAULT 0,
    last_seen    REAL,
    win_top      INTEGER NOT NULL DEFAULT -1,
    win_bits     BLOB NOT NULL DEFAULT x'',
    pending_will INTEGER
);
CREATE INDEX IF NOT EXISTS meters_by_group ON meters (grp);
{READINGS};
{READINGS_VIEW};
CREATE TABLE IF NOT EXISTS requests (
    request     INTEGER NOT NULL,
    meter       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    flow        TEXT NOT NULL,
    range_from  INTEGER,
    range_to    INTEGER,
    tolerance   INTEGER NOT NULL,
    deadline    INTEGER NOT NULL,
    issued_at   REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 1,
    status      TEXT NOT NULL DEFAULT 'pending',
    answered_at REAL,
    parts       INTEGER,
    parts_mask  INTEGER NOT NULL DEFAULT 0,
    detail      INTEGER,
    PRIMARY KEY (request, meter)
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (status) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS sequences (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS collection (
    meter     INTEGER PRIMARY KEY,
    since     INTEGER NOT NULL,          -- first interval start we expect to hold
    next_at   REAL NOT NULL DEFAULT 0,   -- when to look for missing intervals again
    failures  INTEGER NOT NULL DEFAULT 0,
    day       INTEGER NOT NULL DEFAULT 0,
    reads     INTEGER NOT NULL DEFAULT 0 -- collection reads issued on that day
);
CREATE TABLE IF NOT EXISTS counts (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class MeterRow:
    meter: int
    public_key: bytes
    dap: int | None
    group: int | None
    period: int
    win_top: int
    win_bits: int
    pending_will: int | None
    session: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.meter <= 0xFFFFFFFF:
            raise ValueError(f"meter id {self.meter} does not fit 32 bits")
        if len(self.public_key) != 32:
            raise ValueError("a meter's public key is 32 bytes")


def _bits_out(bits: int) -> bytes:
    return bits.to_bytes(8, "big")


# Ingest reads and writes in multi-row statements of up to this many rows
# (_chunked): one statement (one bind-and-step round trip through the
# sqlite3 module, which releases the GIL for the step) per chunk instead of
# one per row. Readings have 7 parameters, well within SQLite's limit of
# 32,766 per statement.
CHUNK = 200
_COLUMNS = "meter, quantity, start, value, quality, received_at, request"
# {values}: where _chunked puts the rows of one chunk
_STAGE = f"INSERT INTO temp.staged_readings ({_COLUMNS}) VALUES {{values}}"
# Rows of (_COLUMNS) from the table {source} into readings_by_hour: the
# staged rows of a batch, or an older store's readings table (_migrate).
_FILE_BY_HOUR = (f"INSERT OR IGNORE INTO readings_by_hour (hour, {_COLUMNS}) "
                 f"SELECT {_HOUR_OF}, {_COLUMNS} FROM {{source}}")
_FROM_STAGE = _FILE_BY_HOUR.format(source="temp.staged_readings")
# One meter's readings: the hours from ?1 to ?2 that hold any reading,
# found in order by stepping from one to the next (each step a seek on the
# primary key, so an hour with no readings costs nothing, however far
# apart two readings are), outermost (CROSS JOIN keeps that order), each
# joined by a seek on (hour, meter = ?3); of those rows, the ones with start
# in [?4, ?5) and of quantity ?6 (NULL: any), ordered.
_HOURS = ("WITH RECURSIVE h(x) AS (SELECT (SELECT min(hour) FROM readings_by_hour "
          "WHERE hour >= ?1) UNION ALL SELECT (SELECT min(hour) FROM readings_by_hour "
          "WHERE hour > h.x) FROM h WHERE h.x < ?2) "
          "SELECT {columns} FROM h CROSS JOIN readings_by_hour r ON r.hour = h.x "
          "AND r.meter = ?3 WHERE r.start >= ?4 AND r.start < ?5 "
          "AND (?6 IS NULL OR r.quantity = ?6) ORDER BY r.quantity, r.start")
# The newest hour holding a reading of quantity ?2 of meter ?1: the same
# steps, downwards from the newest hour, stopping at the first that does.
_LATEST_HOUR = ("WITH RECURSIVE h(x) AS (SELECT max(hour) FROM readings_by_hour UNION ALL "
                "SELECT (SELECT max(hour) FROM readings_by_hour WHERE hour < h.x) FROM h "
                "WHERE h.x IS NOT NULL) "
                "SELECT x FROM h WHERE EXISTS (SELECT 1 FROM readings_by_hour r "
                "WHERE r.hour = h.x AND r.meter = ?1 AND r.quantity = ?2) LIMIT 1")
_STATES = ("SELECT meter, win_top, win_bits, pending_will, session FROM meters "
           "WHERE meter IN (VALUES {values})")
_CHANNELS = ("UPDATE meters SET win_top = v.column2, win_bits = v.column3, "
             "pending_will = v.column4, last_seen = v.column5 FROM (VALUES {values}) AS v "
             "WHERE meters.meter = v.column1")
_ANSWERED = ("UPDATE requests SET status = 'answered', answered_at = ? FROM (VALUES {values}) "
             "AS v WHERE requests.request = v.column1 AND requests.meter = v.column2")


@lru_cache(maxsize=64)
def _multirow(sql: str, width: int, rows: int) -> str:
    """sql with `rows` rows of `width` parameters each in place of {values}."""
    return sql.format(values=",".join(["(" + ", ".join("?" * width) + ")"] * rows))


def _chunked(db: sqlite3.Connection, sql: str, width: int, rows: Sequence[tuple],
             lead: tuple = ()) -> list:
    """Run sql over rows (tuples of `width` values), up to CHUNK of them in
    its {values} list per statement, each statement's parameters after
    `lead`; returns what the statements returned."""
    out: list = []
    for i in range(0, len(rows), CHUNK):
        part = rows[i:i + CHUNK]
        out.extend(db.execute(_multirow(sql, width, len(part)),
                              [*lead, *chain.from_iterable(part)]))
    return out


# A commit writes every page its batch dirtied to the WAL, and with SQLite's
# default a WAL of 1,000 pages is copied back into the database (and
# fsynced) by the commit that fills it. While readings were clustered by
# meter, a batch dirtied a page per meter, nearly every commit also
# checkpointed, and that doubled its cost (make bench, ingest_vs_raw_open).
# Clustered by hour, a batch of a few thousand envelopes dirties a few
# hundred pages, mostly the same ones as the batch before: a larger WAL
# copies such a page back once for many commits; the cache holds them.
CHECKPOINT_PAGES = 16384  # 64 MiB of WAL at 4 KiB pages
CACHE_KIB = 65536


def _bits_in(blob: bytes) -> int:
    return int.from_bytes(blob, "big") if blob else 0


class Store:
    """One connection to the store. Threads may share it: transactions are
    serialised by a lock; the busy ingest path has a connection of its own."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._tx_lock = threading.RLock()
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute(f"PRAGMA cache_size={-CACHE_KIB}")
        self.db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        # Readings on their way in (stage_readings): in memory, per connection.
        self.db.execute("PRAGMA temp_store=MEMORY")
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged_readings (meter, quantity, "
                        "start, value, quality, received_at, request)")
        self.db.executemany(
            "INSERT OR IGNORE INTO quantities (tag, obis, unit) VALUES (?, ?, ?)",
            [(tag, code, unit) for tag, (code, unit) in obis.CODES.items()],
        )
        if self._readings_is_a_table(self.db):
            with self.transaction() as db:
                self._migrate(db)

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _readings_is_a_table(db: sqlite3.Connection) -> bool:
        """True in a store made before readings were clustered by hour."""
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'readings' "
                          "AND type = 'table'").fetchone() is not None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a store made by an earlier version to this schema: if
        `readings` is still a table (readings clustered by meter), its rows
        are copied into readings_by_hour, once, and `readings` becomes the
        view. Inside one write transaction: the other processes opening the
        store wait for it (about 2 s per million readings here), and the
        copy needs free disk space for a second copy of the table."""
        if not Store._readings_is_a_table(db):  # another process did it meanwhile
            return
        path = db.execute("PRAGMA database_list").fetchone()[2]
        log.warning("store %s: re-clustering its readings by hour, once, after an upgrade; "
                    "every process using this store waits until it is done", path)
        began = time.monotonic()
        db.execute(_FILE_BY_HOUR.format(source="readings"))
        copied = db.execute("SELECT changes()").fetchone()[0]
        db.execute("DROP TABLE readings")
        db.execute(READINGS_VIEW)
        log.warning("store %s: %d readings re-clustered in %.1f s", path, copied,
                    time.monotonic() - began)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception. One
        transaction at a time per connection, whichever thread asks."""
        with self._tx_lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # -- registry ------------------------------------------------------------

    def add_dap(self, dap: int, mode: str, operator: str = "utility") -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO daps (dap, mode, operator) VALUES (?, ?, ?) "
                "ON CONFLICT (dap) DO UPDATE SET mode = excluded.mode, operator = excluded.operator",
                (dap, mode, operator),
            )

    def add_meters(self, rows: Sequence[tuple[int, bytes, int | None, int | None, int]]) -> None:
        """Register meters: (meter, public key, dap, group, period), in one
        transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO meters (meter, public_key, dap, grp, period) VALUES (?, ?, ?, ?, ?)",
                rows)

    def meter(self, meter: int) -> MeterRow | None:
        row = self.db.execute(
            "SELECT meter, public_key, dap, grp, period, win_top, win_bits, pending_will, "
            "session FROM meters WHERE meter = ?", (meter,)).fetchone()
        if row is None:
            return None
        return MeterRow(row[0], bytes(row[1]), row[2], row[3], row[4], row[5],
                        _bits_in(row[6]), row[7], row[8])

    def meters(self) -> list[MeterRow]:
        return [
            MeterRow(r[0], bytes(r[1]), r[2], r[3], r[4], r[5], _bits_in(r[6]), r[7], r[8])
            for r in self.db.execute(
                "SELECT meter, public_key, dap, grp, period, win_top, win_bits, pending_will, "
                "session FROM meters ORDER BY meter")
        ]

    def group_members(self, group: int) -> list[tuple[int, int | None]]:
        """(meter, dap) of every meter in a group."""
        return list(self.db.execute(
            "SELECT meter, dap FROM meters WHERE grp = ? ORDER BY meter", (group,)))

    def daps(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT dap, mode FROM daps"))

    # -- sequences -----------------------------------------------------------

    def reserve(self, name: str, block: int) -> int:
        """Reserve `block` consecutive values of a sequence for this process;
        returns the first. Atomic across processes sharing the file, and it
        never hands out a value twice, whatever crashes in between."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM sequences WHERE name = ?", (name,)).fetchone()
            start = 0 if row is None else row[0]
            db.execute(
                "INSERT INTO sequences (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, start + block),
            )
        return start

    # -- ingest --------------------------------------------------------------

    def save_channels(self, db: sqlite3.Connection,
                      channels: Iterable[tuple[int, int, int, int | None, float]]) -> None:
        """(meter, top, bits, pending will, last seen) for every channel that
        moved (each meter once): its replay window and when it was last
        heard, in one statement per CHUNK meters."""
        _chunked(db, _CHANNELS, 5, [(meter, top, _bits_out(bits), will, seen)
                                    for meter, top, bits, will, seen in channels])

    def channel_states(self, db: sqlite3.Connection, meters: Iterable[int]
                       ) -> list[tuple[int, int, int, int | None, int | None]]:
        """(meter, window top, window bits, pending will, session) of each
        of these meters that is registered, in one query per CHUNK."""
        return [(m, top, _bits_in(bits), will, session) for m, top, bits, will, session
                in _chunked(db, _STATES, 1, [(m,) for m in meters])]

    def stage_readings(self, rows: Sequence[tuple]) -> None:
        """Put (meter, quantity, start, value, quality, received_at,
        request) rows in this connection's staging table, in place of what
        it held, for add_staged_readings; inside a transaction or outside
        one. The staging table is a TEMP table: private to the connection
        and outside the store's file, so filling it takes no lock another
        writer waits for, and the costly part of an insert from Python
        (binding every value) is done before the write transaction."""
        with self._tx_lock:
            own = not self.db.in_transaction  # one transaction (on temp only), not one per chunk
            if own:
                self.db.execute("BEGIN")
            try:
                self.db.execute("DELETE FROM temp.staged_readings")
                _chunked(self.db, _STAGE, 7, rows)
            except BaseException:
                if own:
                    self.db.execute("ROLLBACK")
                raise
            if own:
                self.db.execute("COMMIT")

    def add_staged_readings(self, db: sqlite3.Connection) -> int:
        """Inside a write transaction: insert the staged rows into readings
        (one statement, no Python per row); returns how many were new (the
        rest were already stored: duplicates)."""
        before = db.total_changes
        db.execute(_FROM_STAGE)
        return db.total_changes - before

    def set_session(self, db: sqlite3.Connection, meter: int, session: int | None,
                    online: bool, at: float) -> int | None:
        """Record a birth or death; returns the previous session number."""
        row = db.execute("SELECT session FROM meters WHERE meter = ?", (meter,)).fetchone()
        if session is None:
            db.execute("UPDATE meters SET online = ?, last_seen = ? WHERE meter = ?",
                       (int(online), at, meter))
        else:
            db.execute("UPDATE meters SET session = ?, online = ?, last_seen = ? WHERE meter = ?",
                       (session, int(online), at, meter))
        return None if row is None else row[0]

    def bump(self, db: sqlite3.Connection, counts: dict[str, int]) -> None:
        db.executemany(
            "INSERT INTO counts (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            list(counts.items()))

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, value FROM counts"))

    # -- requests ------------------------------------------------------------

    def add_requests(self, rows: Sequence[tuple]) -> None:
        """(request, meter, kind, flow, from, to, tolerance, deadline, issued_at)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO requests (request, meter, kind, flow, range_from, range_to, "
                "tolerance, deadline, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request, meter) DO UPDATE SET attempts = attempts + 1, "
                "deadline = excluded.deadline",
                rows)

    def record_answers(self, db: sqlite3.Connection, at: float,
                       answered: Sequence[tuple[int, int]],
                       parts: Sequence[tuple[int, int, int, int]],
                       statuses: Sequence[tuple[int, int, str, int]]) -> None:
        """Mark requests answered. `answered`: (request, meter) of complete
        answers; `parts`: (request, meter, part, parts) of interval parts;
        `statuses`: (request, meter, status, detail). A late answer still
        counts: the data arrived."""
        _chunked(db, _ANSWERED, 2, answered, (at,))
        if parts:
            db.executemany(
                "UPDATE requests SET parts = ?2, parts_mask = parts_mask | ?1, "
                "status = CASE WHEN (parts_mask | ?1) = (1 << ?2) - 1 THEN 'answered' "
                "ELSE 'partial' END, answered_at = ?3 WHERE request = ?4 AND meter = ?5",
                [(1 << part, n, at, r, m) for r, m, part, n in parts])
        if statuses:
            db.executemany(
                "UPDATE requests SET status = ?, detail = ?, answered_at = ? "
                "WHERE request = ? AND meter = ? AND status != 'answered'",
                # a late status (a held copy answered 'expired') never
                # overwrites a request already answered
                [(st, d, at, r, m) for r, m, st, d in statuses])

    def request_status(self, request: int, meter: int) -> str | None:
        row = self.db.execute("SELECT status FROM requests WHERE request = ? AND meter = ?",
                              (request, meter)).fetchone()
        return None if row is None else row[0]

    def request_detail(self, request: int, meter: int) -> int | None:
        row = self.db.execute("SELECT detail FROM requests WHERE request = ? AND meter = ?",
                              (request, meter)).fetchone()
        return None if row is None else row[0]

    def set_request_status(self, request: int, meters: Iterable[int], status: str) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE requests SET status = ? WHERE request = ? AND meter = ? "
                "AND status IN ('pending', 'partial')",
                [(status, request, m) for m in meters])

    # -- collection ----------------------------------------------------------

    def collection(self, meter: int) -> tuple[int, float, int, int, int] | None:
        """(since, next_at, failures, day, reads) of a meter, or None."""
        row = self.db.execute("SELECT since, next_at, failures, day, reads FROM collection "
                              "WHERE meter = ?", (meter,)).fetchone()
        return None if row is None else tuple(row)

    def collections(self) -> dict[int, tuple[int, float, int, int, int]]:
        return {r[0]: tuple(r[1:]) for r in self.db.execute(
            "SELECT meter, since, next_at, failures, day, reads FROM collection")}

    def set_collection(self, meter: int, since: int, next_at: float, failures: int,
                       day: int, reads: int) -> None:
        self.db.execute(
            "INSERT INTO collection (meter, since, next_at, failures, day, reads) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (meter) DO UPDATE SET since = excluded.since, "
            "next_at = excluded.next_at, failures = excluded.failures, day = excluded.day, "
            "reads = excluded.reads", (meter, since, next_at, failures, day, reads))

    def _of_meter(self, columns: str, meter: int, quantity: int | None, start: int,
                  end: int) -> list[tuple]:
        """_HOURS: these columns of a meter's rows in [start, end)."""
        return self.db.execute(_HOURS.format(columns=columns), (
            start // HOUR, (end - 1) // HOUR, meter, start, end, quantity)).fetchall()

    def interval_starts(self, meter: int, start: int, end: int) -> list[int]:
        """Starts of the import-interval rows held for a meter in [start, end)."""
        return [r[0] for r in self._of_meter("r.start", meter, obis.INTERVAL_IMPORT,
                                             start, end)]

    def latest(self, meter: int, quantity: int) -> tuple[int, int] | None:
        """(start, value) of a meter's latest reading of a quantity, or None.
        Walks down the hours that hold readings, from the newest: it stops
        at once for a meter read recently, and passes every hour stored for
        a meter that has no such reading."""
        row = self.db.execute(_LATEST_HOUR, (meter, quantity)).fetchone()
        if row is None:
            return None
        return self.db.execute(
            "SELECT start, value FROM readings_by_hour WHERE hour = ? AND meter = ? "
            "AND quantity = ? ORDER BY start DESC LIMIT 1", (row[0], meter, quantity)).fetchone()

    def online(self) -> dict[int, bool]:
        return {m: bool(o) for m, o in self.db.execute("SELECT meter, online FROM meters")}

    def online_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM meters WHERE online = 1").fetchone()[0]

    # -- queries -------------------------------------------------------------

    def readings(self, meter: int, quantity: int | None = None, start: int = 0,
                 end: int = 2**62) -> list[tuple[int, int, int, int, int | None]]:
        """(quantity, start, value, quality, request) for a meter, ordered."""
        return self._of_meter("r.quantity, r.start, r.value, r.quality, r.request",
                              meter, quantity, start, end)

    def reading_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM readings_by_hour").fetchone()[0]

    def now(self) -> float:
        return time.time()
