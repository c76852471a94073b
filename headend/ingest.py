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
from dataclasses import dataclass, field

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
_CODES = frozenset(obis.CODES)
_CURRENT_TAGS = frozenset(obis.CURRENT_REGISTERS)
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
        if type(req) is not int or type(ts) is not int or not 0 <= req <= MAX_U32 \
                or not 0 <= ts <= MAX_U32 or not _pairs(regs):
            return False
        keys = regs[0::2]
        return _CODES.issuperset(keys) and _CURRENT_TAGS.issubset(keys)
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
    the caller's framing checks stand for); otherwise the backend's open."""
    if backend.name == "native":
        try:
            from nacl._sodium import ffi, lib
        except ImportError:  # pragma: no cover - PyNaCl without its cffi module
            ffi = lib = None
        if lib is not None:
            new, buffer, box_open = ffi.new, ffi.buffer, lib.crypto_box_open_easy_afternm

            def native_open(key: bytes, nonce: bytes, box: bytes) -> bytes | None:
                n = len(box) - 16
                if n < 0 or len(key) != 32 or len(nonce) != 24:
                    return None
                out = new("unsigned char[]", max(n, 1))
                if box_open(out, box, len(box), nonce, key) != 0:
                    return None
                return buffer(out, n)[:]

            return native_open
    generic = backend.open

    def backend_open(key: bytes, nonce: bytes, box: bytes) -> bytes | None:
        try:
            return generic(key, nonce, box)
        except ProtocolError:
            return None

    return backend_open


class Ingest:
    def __init__(self, store: Store, secret_key: bytes, backend: Backend = DEFAULT) -> None:
        self.store = store
        self.secret_key = secret_key
        self.backend = backend
        self._channels: dict[int, tuple[Channel, MeterRow]] = {}
        self.totals: Counter = Counter()
        self._loads = backend.loads
        self._box_open = _box_opener(backend)

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

    def forget(self, meters) -> None:
        """Drop cached channels so they are reloaded from the store."""
        for m in meters:
            self._channels.pop(m, None)

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
        """Open and check one envelope, and accept it into its channel's
        replay window. The common case - a sealed reading from a known
        meter on its registered path, every field as it should be - takes a
        short path: the same checks, inlined. Whatever that path does not
        accept goes to the general path (_open_checked), which raises
        exactly as it always has. Nothing is changed (the window is not
        moved) before every check has passed."""
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
                        obj = self._loads(pt, MAX_INNER)
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
                            ch.accept(mtype, ctr, body)
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
        ch.accept(mtype, ctr, body)
        return ch, mtype, ctr, body

    # -- the batch -----------------------------------------------------------

    def process(self, messages_in: list[tuple[str, bytes]], now: float) -> Batch:
        """Open and store a batch of (topic, payload). Bad input is counted
        and skipped; it never raises for it. Raises only if the store fails,
        and then nothing of the batch is stored or remembered."""
        batch = Batch()
        rows: list[tuple] = []
        answered: list[tuple[int, int]] = []
        parts: list[tuple[int, int, int, int]] = []
        statuses: list[tuple[int, int, str, int]] = []
        sessions: list[tuple[int, int]] = []  # (meter, birth index, or -1: a death)
        moved: dict[int, Channel] = {}
        seen: dict[int, float] = {}
        imp_t, exp_t = obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT
        reg_imp, reg_exp = obis.ENERGY_IMPORT, obis.ENERGY_EXPORT
        for topic, payload in messages_in:
            try:
                envs, dap, owner = self._envelopes(topic, payload, batch)
            except ProtocolError as e:
                batch.rejected[e.reason] += 1
                log.warning("rejected message on %s: %s (%s)", topic, e, e.reason)
                continue
            for env in envs:
                try:
                    ch, mtype, ctr, body = self._open(env, dap, owner)
                except ProtocolError as e:
                    batch.rejected[e.reason] += 1
                    if e.reason != "duplicate":
                        log.warning("rejected envelope via %s: %s (%s)", topic, e, e.reason)
                    continue
                m = ch.meter
                moved[m] = ch
                seen[m] = now
                batch.accepted += 1
                if mtype == T_INTERVAL:
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
                    batch.answers.append((req, m, "part"))
                    batch.intervals.append((m, start, len(imps)))
                elif mtype == T_CURRENT:
                    req, ts, regs = body
                    for j in range(0, len(regs), 2):
                        rows.append((m, regs[j], ts, regs[j + 1], 0, now, req))
                    answered.append((req, m))
                    batch.answers.append((req, m, "answered"))
                elif mtype == T_STATUS:
                    req, code, detail = body
                    statuses.append((req, m, STATUS_NAMES[code], detail))
                    batch.answers.append((req, m, STATUS_NAMES[code]))
                elif mtype == T_BIRTH:
                    sessions.append((m, len(batch.births)))
                    batch.births.append((m, None, body[0], body[4]))
                elif mtype == T_DEATH:
                    sessions.append((m, -1))
                    batch.deaths.append((m, body[0], body[1]))
        store = self.store
        try:
            with store.transaction() as db:
                if rows:
                    new = store.add_readings(db, rows)
                    batch.stored = new
                    batch.duplicate_rows = len(rows) - new
                if moved:
                    store.save_channels(db, [(m, ch.window.top, ch.window.bits,
                                              ch.pending_will, seen[m])
                                             for m, ch in moved.items()])
                store.record_answers(db, now, answered, parts, statuses)
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
            self.forget(moved)  # their windows moved in memory only
            raise
        self.totals["accepted"] += batch.accepted
        self.totals["stored"] += batch.stored
        self.totals["duplicate_rows"] += batch.duplicate_rows
        for k, v in batch.rejected.items():
            self.totals[f"rejected:{k}"] += v
        return batch
