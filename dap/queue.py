"""The disk queue: every envelope the DAP accepts, from the moment it is
acknowledged to the broker until the head-end acknowledges the bundle that
carried it. SQLite in WAL mode, in state_dir.

One writer (the service's loop) makes changes (staged in memory, written
in one transaction) and calls commit(); the service acknowledges nothing
to the broker and publishes no new bundle before that commit. So after any crash,
kill -9 included:

- an envelope acknowledged to the broker is in the queue;
- an envelope not yet in a bundle goes back into the aggregator;
- a bundle is published only after its sequence number is committed, and
  numbers come from a persisted counter: none is ever used twice;
- a bundle not acknowledged by the head-end is sent again.

An envelope is stored once: a broker redelivery (of a message committed
just before a crash or a lost connection, whose acknowledgement never
reached the broker) is recognised by its meter hint and nonce among the
DEDUP_WINDOW envelopes stored last, and dropped. (A memory set rather than
a unique index: random keys in an index cost several times the write
volume of the rows themselves.)

`bytes` counts each envelope's length plus ENTRY_OVERHEAD for its row and
index entries: an estimate of the disk it uses, which the disk budget is
checked against. The file does not shrink when rows are deleted; SQLite
reuses the freed pages.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from dap.errors import QueueError

ENTRY_OVERHEAD = 64
DEDUP_WINDOW = 10_000  # recent envelopes recognised when the broker redelivers them
CHUNK = 100  # rows per INSERT statement
MAX_SEQ = (1 << 63) - 1  # SQLite integers are signed 64-bit

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS envelopes (
    id       INTEGER PRIMARY KEY,
    env      BLOB NOT NULL,
    received REAL NOT NULL,         -- wall clock
    flush_by REAL,                  -- wall clock; NULL: the normal window
    bundle   INTEGER                -- NULL: not yet in a bundle
);
CREATE INDEX IF NOT EXISTS envelopes_bundle ON envelopes (bundle);
CREATE TABLE IF NOT EXISTS bundles (
    seq      INTEGER PRIMARY KEY,
    created  REAL NOT NULL,         -- wall clock
    items    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,      -- as counted in DiskQueue.bytes
    attempts INTEGER NOT NULL,      -- times published
    sent_at  REAL NOT NULL          -- the service's clock at the last send; 0: to send
);
CREATE INDEX IF NOT EXISTS bundles_sent ON bundles (sent_at, seq);
"""


@dataclass(frozen=True)
class Pending:
    """An envelope not yet in a bundle (recovered after a restart)."""

    id: int
    env: bytes
    received: float
    flush_by: float | None


@dataclass(frozen=True)
class Acked:
    """What a head-end acknowledgement removed."""

    bundles: int = 0
    envelopes: int = 0
    bytes: int = 0


def entry_size(env: bytes) -> int:
    return len(env) + ENTRY_OVERHEAD


class DiskQueue:
    def __init__(self, path: str | Path, budget: int, warn_fraction: float = 0.8,
                 sync: str = "full") -> None:
        self.path = Path(path)
        self.budget = budget
        self.warn_fraction = warn_fraction
        self._lock_fd = self._lock(self.path)
        self._new_envs: dict[int, list[object]] = {}  # staged: id -> row
        self._new_bundles: list[tuple[int, float, int, int, int, float]] = []
        self._seq_dirty = False
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=%s" % ("FULL" if sync == "full" else "NORMAL"))
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            self._recover()
        except sqlite3.Error as e:
            os.close(self._lock_fd)
            raise QueueError(f"cannot open the disk queue {self.path}: {e}; if the file is "
                             "damaged, move it away (its unsent readings are lost; the "
                             "head-end re-reads gaps)") from e

    @staticmethod
    def _lock(path: Path) -> int:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise QueueError(f"cannot use state_dir {path.parent}: {e.strerror}; create it "
                             "and make it writable by the DAP's user") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise QueueError(f"another DAP process is using {path.parent}: stop it first "
                             "(each DAP needs its own state_dir)") from None
        return fd

    def _recover(self) -> None:
        db = self.db
        row = db.execute("SELECT value FROM meta WHERE name = 'next_seq'").fetchone()
        top = db.execute("SELECT MAX(seq) FROM bundles").fetchone()[0]
        if row is None:
            # A new queue starts at the time in microseconds, so that even a
            # wiped state_dir does not reuse recent sequence numbers.
            start = max(int(time.time() * 1e6), (top or 0) + 1)
            db.execute("INSERT INTO meta (name, value) VALUES ('next_seq', ?)", (start,))
            self._next_seq = start
        else:
            self._next_seq = max(row[0], (top or 0) + 1)
        # Every unacknowledged bundle is sent again, oldest first.
        db.execute("UPDATE bundles SET sent_at = 0 WHERE sent_at != 0")
        self._count()

    def _count(self) -> None:
        """Counters and the recent-envelope set, from what is committed."""
        n, size = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(env)), 0) FROM envelopes").fetchone()
        self.depth: int = int(n)
        self.bytes: int = int(size) + self.depth * ENTRY_OVERHEAD
        self.unacked: int = int(self.db.execute("SELECT COUNT(*) FROM bundles").fetchone()[0])
        self._next_id = int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM envelopes")
                            .fetchone()[0]) + 1
        self._recent: set[bytes] = set()
        self._order: deque[bytes] = deque()
        for (ref,) in reversed(self.db.execute(
                "SELECT SUBSTR(env, 2, 28) FROM envelopes ORDER BY id DESC LIMIT ?",
                (DEDUP_WINDOW,)).fetchall()):
            self._remember(ref)

    def _remember(self, ref: bytes) -> None:
        self._recent.add(ref)
        self._order.append(ref)
        if len(self._order) > DEDUP_WINDOW:
            self._recent.discard(self._order.popleft())

    # -- the budget ----------------------------------------------------------

    @property
    def fill(self) -> float:
        """Fraction of the disk budget in use."""
        return self.bytes / self.budget

    @property
    def warning(self) -> bool:
        return self.bytes >= self.warn_fraction * self.budget

    def has_room(self, env: bytes) -> bool:
        return self.bytes + entry_size(env) <= self.budget

    # -- changes (inside the open transaction) -------------------------------
    #
    # New envelopes and bundles are staged in memory and written in
    # multi-row INSERTs before anything reads the tables and at commit():
    # one statement per chunk instead of one per row (each statement also
    # costs a round of the GIL against paho's network thread).

    def _begin(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")

    def _flush(self) -> None:
        if not (self._new_envs or self._new_bundles or self._seq_dirty):
            return
        self._begin()
        rows = list(self._new_envs.values())
        for i in range(0, len(rows), CHUNK):
            part = rows[i:i + CHUNK]
            self.db.execute("INSERT INTO envelopes (id, env, received, flush_by, bundle) VALUES "
                            + ",".join(["(?,?,?,?,?)"] * len(part)), [x for r in part for x in r])
        for i in range(0, len(self._new_bundles), CHUNK):
            bundles = self._new_bundles[i:i + CHUNK]
            self.db.execute("INSERT INTO bundles (seq, created, items, bytes, attempts, sent_at) "
                            "VALUES " + ",".join(["(?,?,?,?,?,?)"] * len(bundles)),
                            [x for r in bundles for x in r])
        if self._seq_dirty:
            self.db.execute("UPDATE meta SET value = ? WHERE name = 'next_seq'",
                            (self._next_seq,))
        self._new_envs.clear()
        self._new_bundles.clear()
        self._seq_dirty = False

    def put(self, env: bytes, received: float, flush_by: float | None = None) -> int | None:
        """Store one envelope (its framing already checked). Returns its id,
        or None if the same envelope was stored recently (a redelivery).
        Does not check the budget: call has_room() first."""
        ref = env[1:29]
        if ref in self._recent:
            return None
        self._remember(ref)
        rid = self._next_id
        self._next_id += 1
        self._new_envs[rid] = [rid, env, received, flush_by, None]
        self.depth += 1
        self.bytes += entry_size(env)
        return rid

    def bundle(self, items: list[tuple[int, bytes]], created: float, sent_at: float) -> int:
        """Put envelopes (id, bytes) into a new bundle; returns its sequence
        number. `sent_at`: the caller's clock if it publishes the bundle
        right after the commit, 0 if it cannot (it is then sent later)."""
        if not items:
            raise ValueError("a bundle needs at least one envelope")
        seq = self._next_seq
        if seq > MAX_SEQ:
            raise QueueError("bundle sequence numbers are exhausted")
        self._next_seq = seq + 1
        self._seq_dirty = True
        size = sum(entry_size(env) for _, env in items)
        self._new_bundles.append((seq, created, len(items), size, 1 if sent_at else 0, sent_at))
        stored = []
        for i, _ in items:
            row = self._new_envs.get(i)
            if row is not None:
                row[4] = seq
            else:
                stored.append((seq, i))
        if stored:
            self._begin()
            self.db.executemany("UPDATE envelopes SET bundle = ? WHERE id = ?", stored)
        self.unacked += 1
        return seq

    def mark_sent(self, seq: int, sent_at: float) -> None:
        self._flush()
        self.db.execute("UPDATE bundles SET sent_at = ?, attempts = attempts + 1 WHERE seq = ?",
                        (sent_at, seq))

    def ack(self, ranges: list[tuple[int, int]] | list[list[int]]) -> Acked:
        """Delete the bundles in the head-end's ranges [first, last] and
        their envelopes. Sequence numbers not in the queue are ignored."""
        self._flush()
        bundles = envelopes = size = 0
        for first, last in ranges:
            if first > MAX_SEQ:
                continue
            last = min(last, MAX_SEQ)
            n, items, b = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(items), 0), COALESCE(SUM(bytes), 0) "
                "FROM bundles WHERE seq BETWEEN ? AND ?", (first, last)).fetchone()
            if not n:
                continue
            self.db.execute("DELETE FROM envelopes WHERE bundle BETWEEN ? AND ?", (first, last))
            self.db.execute("DELETE FROM bundles WHERE seq BETWEEN ? AND ?", (first, last))
            bundles += n
            envelopes += items
            size += b
        self.unacked -= bundles
        self.depth -= envelopes
        self.bytes -= size
        return Acked(bundles, envelopes, size)

    def commit(self) -> None:
        """Make every change so far durable. Raises QueueError (after a
        rollback) if the database refuses."""
        try:
            self._flush()
            if self.db.in_transaction:
                self.db.execute("COMMIT")
        except sqlite3.Error as e:
            self.rollback()
            raise QueueError(f"cannot write the disk queue {self.path}: {e}") from e

    def rollback(self) -> None:
        """Forget every change since the last commit."""
        self._new_envs.clear()
        self._new_bundles.clear()
        self._seq_dirty = False
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._count()

    # -- reads -------------------------------------------------------------------

    def unbundled(self) -> list[Pending]:
        """Envelopes in no bundle, oldest first (to refill the aggregator)."""
        self._flush()
        return [Pending(*row) for row in self.db.execute(
            "SELECT id, env, received, flush_by FROM envelopes WHERE bundle IS NULL ORDER BY id")]

    def due(self, before: float, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` bundles (seq, attempts so far) last sent at or
        before `before` (or never), the longest waiting first."""
        self._flush()
        return list(self.db.execute(
            "SELECT seq, attempts FROM bundles WHERE sent_at <= ? ORDER BY sent_at, seq LIMIT ?",
            (max(before, 0.0), limit)))

    def envelopes_of(self, seq: int) -> list[bytes]:
        self._flush()
        return [r[0] for r in self.db.execute(
            "SELECT env FROM envelopes WHERE bundle = ? ORDER BY id", (seq,))]

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def close(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.close()
        finally:
            os.close(self._lock_fd)
