"""Ingest: open what meters send, check every field, store the readings.

Sans-IO like the protocol under it: the service hands in (topic, payload)
pairs and the time, and gets back what to acknowledge. All the database
writes of one batch are one transaction, committed before anything is
acknowledged, so a crash between the two only causes a redelivery, which
the replay windows and the readings' primary key turn into a no-op.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple

from headend.store import MeterRow, Store
from shared import envelope, gateway, messages, obis, topics
from shared.backend import DEFAULT, Backend
from shared.channel import Channel
from shared.const import (
    DOWN,
    ENV_HEADER,
    ENV_SEALED,
    K_BUNDLE,
    MAC_BYTES,
    MAX_ENVELOPE,
    MAX_INNER,
    MAX_PARTS,
    MAX_ROWS,
    MAX_U32,
    S_EXPIRED,
    S_MALFORMED,
    S_NO_DATA,
    S_UNSUPPORTED,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_STATUS,
    UP,
    VERSION,
)
from shared.errors import (
    DecodeError,
    MismatchError,
    ProtocolError,
    TooLarge,
    UnknownPeerError,
)
from shared.replay import ReplayWindow

log = logging.getLogger("headend.ingest")

STATUS_NAMES = {S_NO_DATA: "no-data", S_EXPIRED: "expired", S_MALFORMED: "malformed",
                S_UNSUPPORTED: "unsupported"}


_INT = {int}
# Every key list a current reading may carry: the required registers plus
# any of the others, in order (a handful: obis.CODES is short).
_CURRENT_KEYS = frozenset(
    tuple(sorted({*obis.CURRENT_REGISTERS, *extra}))
    for n in range(len(obis.CODES) + 1)
    for extra in combinations(sorted(obis.CODES), n))
_UPLINK = frozenset(messages.UPLINK)
_MIN_ENVELOPE = ENV_HEADER + MAC_BYTES


def _uints(x: list) -> bool:
    """Every item of the list x an int (bool is not) in 0..2**32-1."""
    return not x or ({*map(type, x)} == _INT and min(x) >= 0 and max(x) <= MAX_U32)


def _pairs(x: object) -> bool:
    """A [key, value, ...] list as messages.check_body's PAIRS requires."""
    if type(x) is not list or len(x) & 1 or len(x) > 2 * MAX_ROWS or not _uints(x):
        return False
    keys = x[0::2]
    return len(set(keys)) == len(keys) and keys == sorted(keys)


def _body_ok(mtype: int, body: list) -> bool:
    """True only when messages.check_body(mtype, body) would accept the body:
    the same checks, for the two response types that carry readings,
    written with set and min/max operations that run in C. Anything else
    (False) is handed to check_body itself, which raises exactly as it
    always has; tests/test_ingest_fastpath.py holds the two to the same
    verdicts."""
    if mtype == T_CURRENT:
        if len(body) != 3:
            return False
        req, ts, regs = body
        # keys in _CURRENT_KEYS: sorted, unique, known, every required one
        return (type(req) is int and type(ts) is int and 0 <= req <= MAX_U32
                and 0 <= ts <= MAX_U32 and type(regs) is list and not len(regs) & 1
                and tuple(regs[0::2]) in _CURRENT_KEYS and _uints(regs))
    if mtype == T_INTERVAL:
        if len(body) != 10:
            return False
        head = body[:7]
        imps, exps, flags = body[7], body[8], body[9]
        if not _uints(head) or type(imps) is not list or type(exps) is not list \
                or len(imps) > MAX_ROWS or len(exps) > MAX_ROWS \
                or not _uints(imps) or not _uints(exps) or not _pairs(flags):
            return False
        part, parts, start, period = head[1], head[2], head[3], head[4]
        rows = len(imps)
        if not 0 <= part < parts <= MAX_PARTS or period == 0 or start % period \
                or len(exps) != rows:
            return False
        for j in range(0, len(flags), 2):
            if flags[j] >= rows or flags[j + 1] == 0:
                return False
        return True
    return False


class _NoCounter:
    """Ingest only receives; sealing on an ingest channel is a bug."""

    def next(self) -> int:
        raise RuntimeError("the ingest side does not send")


@dataclass
class Batch:
    """What one ingest batch did."""

    stored: int = 0                # new reading rows
    duplicate_rows: int = 0        # rows already stored (redeliveries, re-reads)
    accepted: int = 0              # envelopes accepted
    rejected: Counter = field(default_factory=Counter)  # reason -> envelopes
    acks: dict[int, list[int]] = field(default_factory=dict)  # dap -> bundle seqs
    births: list[tuple[int, int | None, int, int]] = field(default_factory=list)
    deaths: list[tuple[int, int, int]] = field(default_factory=list)  # meter, session, reason
    answers: list[tuple[int, int, str]] = field(default_factory=list)  # request, meter, status
    intervals: list[tuple[int, int, int]] = field(default_factory=list)  # meter, first start, rows


def _box_opener(backend: Backend):
    """open(key, nonce, box) -> plaintext, or None if the box does not
    open (or is malformed): the general path then raises the error. With
    PyNaCl it calls libsodium's crypto_box_open_easy_afternm through cffi
    directly (what PyNaCl's binding does, less its argument checks, which
    the caller's framing checks stand for), into one buffer it keeps;
    otherwise the backend's open. One opener per Ingest: not for two
    threads at once."""
    if backend.name == "native":
        try:
            from nacl._sodium import ffi, lib
        except ImportError:  # pragma: no cover - PyNaCl without its cffi module
            ffi = lib = None
        if lib is not None:
            out = ffi.new("unsigned char[]", MAX_ENVELOPE)
            plain = ffi.buffer(out)
            box_open = lib.crypto_box_open_easy_afternm

            def native_open(key: bytes, nonce: bytes, box: bytes) -> bytes | None:
                n = len(box) - MAC_BYTES
                if not 0 <= n <= MAX_ENVELOPE or len(key) != 32 or len(nonce) != 24:
                    return None
                if box_open(out, box, n + MAC_BYTES, nonce, key) != 0:
                    return None
                return plain[:n]

            return native_open
    generic = backend.open

    def backend_open(key: bytes, nonce: bytes, box: bytes) -> bytes | None:
        try:
            return generic(key, nonce, box)
        except ProtocolError:
            return None

    return backend_open


class _Rows:
    """What a batch of opened envelopes writes: reading rows (meter,
    quantity, start, value, quality, received at, request), complete
    answers (request, meter), interval parts (request, meter, part, parts),
    statuses (request, meter, status, detail), and the Batch's answers and
    intervals."""

    __slots__ = ("rows", "answered", "parts", "statuses", "answers", "intervals")

    def __init__(self, opened: list[tuple[Channel, int, int, list]], now: float) -> None:
        rows: list[tuple] = []
        answered: list[tuple[int, int]] = []
        parts: list[tuple[int, int, int, int]] = []
        statuses: list[tuple[int, int, str, int]] = []
        answers: list[tuple[int, int, str]] = []
        intervals: list[tuple[int, int, int]] = []
        imp_t, exp_t = obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT
        reg_imp, reg_exp = obis.ENERGY_IMPORT, obis.ENERGY_EXPORT
        for ch, mtype, _, body in opened:
            m = ch.meter
            if mtype == T_CURRENT:
                req, ts, regs = body
                for j in range(0, len(regs), 2):
                    rows.append((m, regs[j], ts, regs[j + 1], 0, now, req))
                answered.append((req, m))
                answers.append((req, m, "answered"))
            elif mtype == T_INTERVAL:
                req, part, n, start, period, b_imp, b_exp, imps, exps, flags = body
                rows.append((m, reg_imp, start, b_imp, 0, now, req))
                rows.append((m, reg_exp, start, b_exp, 0, now, req))
                quality = dict(zip(flags[0::2], flags[1::2])) if flags else {}
                t = start
                for i in range(len(imps)):
                    q = quality.get(i, 0)
                    rows.append((m, imp_t, t, imps[i], q, now, req))
                    rows.append((m, exp_t, t, exps[i], q, now, req))
                    t += period
                parts.append((req, m, part, n))
                answers.append((req, m, "part"))
                intervals.append((m, start, len(imps)))
            elif mtype == T_STATUS:
                req, code, detail = body
                statuses.append((req, m, STATUS_NAMES[code], detail))
                answers.append((req, m, STATUS_NAMES[code]))
        self.rows, self.answered, self.parts, self.statuses = rows, answered, parts, statuses
        self.answers, self.intervals = answers, intervals


class Prepared(NamedTuple):
    """A batch opened and checked (Ingest.prepare), not yet stored."""

    batch: Batch
    opened: list[tuple[Channel, int, int, list]]
    made: _Rows
    now: float


class Ingest:
    def __init__(self, store: Store, secret_key: bytes, backend: Backend = DEFAULT) -> None:
        self.store = store
        self.secret_key = secret_key
        self.backend = backend
        self._channels: dict[int, tuple[Channel, MeterRow]] = {}
        self.totals: Counter = Counter()
        self._loads = backend.loads
        self._box_open = _box_opener(backend)
        # Meters whose cached replay state (window, session, pending will)
        # is known to match the store as of data version _version; see
        # _refresh. Other processes (another ingest worker, the CLI) and
        # this process's other connections commit to the same file.
        self._fresh: set[int] = set()
        self._version: int | None = None

    def channel(self, meter: int) -> tuple[Channel, MeterRow]:
        got = self._channels.get(meter)
        if got is None:
            row = self.store.meter(meter)
            if row is None:
                raise UnknownPeerError(f"meter {meter} is not in the registry")
            key = self.backend.beforenm(row.public_key, self.secret_key)
            window = ReplayWindow(top=row.win_top, bits=row.win_bits)
            ch = Channel(self.backend, key, meter, DOWN, _NoCounter(), window)
            ch.pending_will = row.pending_will
            ch.session = row.session
            got = self._channels[meter] = (ch, row)
        return got

    def _refresh(self, db, meters: Iterable[int]) -> None:
        """Inside the write transaction: make the cached replay state of
        these meters the store's. Each worker of a shared subscription
        keeps its own cache, and a meter's messages go to either worker;
        a window the other worker moved since must be read again, or a
        replay of what that worker accepted would be accepted here. SQLite's
        data_version changes when any other connection commits: while it
        has not, the cache is the store (one pragma per batch); once it
        has, every cached state is suspect and the batch's meters are read
        again, in one query per CHUNK, under the write lock, so nothing can
        move them before this transaction commits."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._fresh.clear()
            self._version = version
        stale = [m for m in meters if m not in self._fresh]
        if not stale:
            return
        for meter, top, bits, will, session in self.store.channel_states(db, stale):
            ch = self._channels[meter][0]
            ch.window.top, ch.window.bits = top, bits
            ch.pending_will, ch.session = will, session
        self._fresh.update(stale)

    # -- parsing -------------------------------------------------------------

    def _envelopes(self, topic: str, payload: bytes, batch: Batch
                   ) -> tuple[list[bytes], int | None, int | None]:
        """The envelopes a message carries, the DAP they came through, and
        the meter whose own topic it came on (flow A)."""
        leaf, meter, dap = topics.parse(topic)
        if leaf != "up" or (meter is not None and dap is not None):
            raise DecodeError(f"the head-end does not ingest topic {topic!r}")
        if meter is not None:  # flow A: one envelope straight from a meter
            if len(payload) > MAX_ENVELOPE:
                raise TooLarge(f"{len(payload)} bytes on {topic}")
            return [payload], None, meter
        msg = gateway.decode(self.backend, payload)
        if msg[0] != K_BUNDLE:
            raise DecodeError(f"expected a bundle on {topic}")
        _, bundle_dap, seq, items = msg
        if bundle_dap != dap:
            raise MismatchError(f"bundle from DAP {bundle_dap} on DAP {dap}'s topic")
        batch.acks.setdefault(dap, []).append(seq)
        return items, dap, None

    def _open(self, env: bytes, dap: int | None, on_topic_of: int | None
              ) -> tuple[Channel, int, int, list]:
        """Open and check one envelope; changes nothing (the replay window
        is checked and moved later, in process(), under the write lock).
        The common case - a sealed reading from a known meter on its
        registered path, every field as it should be - takes a short path:
        the same checks, inlined. Whatever that path does not accept goes
        to the general path (_open_checked), which raises exactly as it
        always has."""
        n = len(env)
        if _MIN_ENVELOPE <= n <= MAX_ENVELOPE and env[0] == ENV_SEALED:
            hint = int.from_bytes(env[1:5], "big")
            got = self._channels.get(hint)
            if got is not None and got[1].dap == dap and (on_topic_of is None
                                                          or hint == on_topic_of):
                ch = got[0]
                pt = self._box_open(ch.key, env[5:ENV_HEADER], env[ENV_HEADER:])
                if pt is not None:
                    try:
                        obj = self._loads(pt, MAX_INNER, True)
                    except ProtocolError:
                        obj = None
                    if type(obj) is list and len(obj) >= 5:
                        v, m, d, mtype, ctr = obj[:5]
                        if (v == VERSION and type(v) is int and m == hint and type(m) is int
                                and d == UP and type(d) is int and type(mtype) is int
                                and mtype in _UPLINK and type(ctr) is int
                                and 0 <= ctr <= MAX_U32):
                            body = obj[5:]
                            if not _body_ok(mtype, body):
                                messages.check_body(mtype, body)  # raises if it must
                            return ch, mtype, ctr, body
        return self._open_checked(env, dap, on_topic_of)

    def _open_checked(self, env: bytes, dap: int | None, on_topic_of: int | None
                      ) -> tuple[Channel, int, int, list]:
        kind, hint = envelope.peek(env)
        if kind != ENV_SEALED:
            raise DecodeError("meters only send sealed envelopes")
        if on_topic_of is not None and hint != on_topic_of:
            raise MismatchError(f"meter {hint}'s envelope on meter {on_topic_of}'s topic")
        ch, row = self.channel(hint)
        if row.dap != dap:
            raise MismatchError(
                f"meter {hint} is registered {'behind DAP %d' % row.dap if row.dap else 'direct'},"
                f" but this came {'through DAP %d' % dap if dap else 'direct'}")
        mtype, ctr, body = ch.unseal(env)
        messages.check_body(mtype, body)
        return ch, mtype, ctr, body

    # -- the batch -----------------------------------------------------------

    def process(self, messages_in: list[tuple[str, bytes]], now: float) -> Batch:
        """Open and store a batch of (topic, payload). Bad input is counted
        and skipped; it never raises for it. Raises only if the store fails,
        and then nothing of the batch is stored or remembered.

        Two phases: prepare() opens and checks every envelope, with no lock
        held and nothing changed; commit() then, in the write transaction,
        brings the replay state of the batch's meters up to date with the
        store (_refresh), passes each envelope through its replay check in
        the order it came, and writes what passed."""
        return self.commit(self.prepare(messages_in, now))

    def prepare(self, messages_in: list[tuple[str, bytes]], now: float) -> Prepared:
        """process()'s first phase: open and check every envelope, and make
        the rows the batch stores if each passes its replay check. Writes
        nothing and moves no replay window (it may read a meter's channel
        into the cache)."""
        batch = Batch()
        opened: list[tuple[Channel, int, int, list]] = []
        for topic, payload in messages_in:
            try:
                envs, dap, owner = self._envelopes(topic, payload, batch)
            except ProtocolError as e:
                batch.rejected[e.reason] += 1
                log.warning("rejected message on %s: %s (%s)", topic, e, e.reason)
                continue
            for env in envs:
                try:
                    opened.append(self._open(env, dap, owner))
                except ProtocolError as e:  # never a replay: that is checked below
                    batch.rejected[e.reason] += 1
                    log.warning("rejected envelope via %s: %s (%s)", topic, e, e.reason)
        # What the batch stores if every envelope passes its replay check;
        # made again in the rare batch where one fails.
        return Prepared(batch, opened, _Rows(opened, now), now)

    def commit(self, prepared: Prepared) -> Batch:
        """process()'s second phase: stage the rows (outside the lock), then
        the replay checks and every write in one transaction."""
        batch, opened, made, now = prepared
        store = self.store
        if made.rows:
            store.stage_readings(made.rows)
        moved: dict[int, Channel] = {}
        try:
            with store.transaction() as db:
                self._refresh(db, {item[0].meter for item in opened})
                kept = []
                sessions: list[tuple[int, int]] = []  # (meter, birth index, or -1: a death)
                for item in opened:
                    ch, mtype, ctr, body = item
                    try:
                        ch.accept(mtype, ctr, body)
                    except ProtocolError as e:
                        batch.rejected[e.reason] += 1
                        if e.reason != "duplicate":
                            log.warning("rejected envelope of meter %d: %s (%s)",
                                        ch.meter, e, e.reason)
                        continue
                    kept.append(item)
                    moved[ch.meter] = ch
                    if mtype == T_BIRTH:
                        sessions.append((ch.meter, len(batch.births)))
                        batch.births.append((ch.meter, None, body[0], body[4]))
                    elif mtype == T_DEATH:
                        sessions.append((ch.meter, -1))
                        batch.deaths.append((ch.meter, body[0], body[1]))
                if len(kept) != len(opened):
                    made = _Rows(kept, now)
                    if made.rows:
                        store.stage_readings(made.rows)
                batch.accepted = len(kept)
                batch.answers, batch.intervals = made.answers, made.intervals
                if made.rows:
                    new = store.add_staged_readings(db)
                    batch.stored = new
                    batch.duplicate_rows = len(made.rows) - new
                if moved:
                    store.save_channels(db, [(m, ch.window.top, ch.window.bits,
                                              ch.pending_will, now)
                                             for m, ch in moved.items()])
                store.record_answers(db, now, made.answered, made.parts, made.statuses)
                # Births and deaths in the order they came: an old session's
                # will and the next birth often travel in one bundle.
                for m, i in sessions:
                    if i < 0:
                        store.set_session(db, m, None, False, now)
                    else:
                        _, _, session, oldest = batch.births[i]
                        prev = store.set_session(db, m, session, True, now)
                        batch.births[i] = (m, prev, session, oldest)
                counts = {f"rejected:{k}": v for k, v in batch.rejected.items()}
                counts["accepted"] = batch.accepted
                counts["stored"] = batch.stored
                store.bump(db, counts)
        except BaseException:
            self._fresh.difference_update(moved)  # their state moved in memory only
            raise
        self.totals["accepted"] += batch.accepted
        self.totals["stored"] += batch.stored
        self.totals["duplicate_rows"] += batch.duplicate_rows
        for k, v in batch.rejected.items():
            self.totals[f"rejected:{k}"] += v
        return batch
