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

from shared import envelope, gateway, messages, obis, topics
from shared.backend import DEFAULT, Backend
from shared.channel import Channel
from shared.const import (
    DOWN,
    ENV_SEALED,
    K_BUNDLE,
    MAX_ENVELOPE,
    S_EXPIRED,
    S_MALFORMED,
    S_NO_DATA,
    S_UNSUPPORTED,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_STATUS,
)
from shared.errors import (
    DecodeError,
    MismatchError,
    ProtocolError,
    TooLarge,
    UnknownPeerError,
)
from shared.replay import ReplayWindow

from headend.store import MeterRow, Store

log = logging.getLogger("headend.ingest")

STATUS_NAMES = {S_NO_DATA: "no-data", S_EXPIRED: "expired", S_MALFORMED: "malformed",
                S_UNSUPPORTED: "unsupported"}


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


class Ingest:
    def __init__(self, store: Store, secret_key: bytes, backend: Backend = DEFAULT) -> None:
        self.store = store
        self.secret_key = secret_key
        self.backend = backend
        self._channels: dict[int, tuple[Channel, MeterRow]] = {}
        self.totals: Counter = Counter()

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
                    batch.births.append((m, None, body[0], body[4]))
                elif mtype == T_DEATH:
                    batch.deaths.append((m, body[0], body[1]))
        store = self.store
        try:
            with store.transaction() as db:
                if rows:
                    new = store.add_readings(db, rows)
                    batch.stored = new
                    batch.duplicate_rows = len(rows) - new
                if moved:
                    store.save_windows(db, [(m, ch.window.top, ch.window.bits, ch.pending_will)
                                            for m, ch in moved.items()])
                    store.mark_seen(db, seen.items())
                store.record_answers(db, now, answered, parts, statuses)
                for i, (m, _, session, oldest) in enumerate(batch.births):
                    prev = store.set_session(db, m, session, True, now)
                    batch.births[i] = (m, prev, session, oldest)
                for m, _, _ in batch.deaths:
                    store.set_session(db, m, None, False, now)
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
