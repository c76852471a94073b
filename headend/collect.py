"""Collection and gap recovery: which interval ranges to read from which
meter, and the read success rate.

For every meter the head-end expects one profile row per interval from
`since` (its first birth, less a backfill) up to the last closed interval.
It looks for the ranges it does not hold and re-reads exactly those, with
backoff after a failure and a budget of reads per meter per day. A birth
with a new session triggers an immediate catch-up. The same mechanism does
the routine collection (the newest intervals are "missing" until read) and
recovers anything lost on the way: a dropped message, a broker restart, a
full queue.

Sans-IO: time is passed in; the service issues the reads it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from headend.store import Store

log = logging.getLogger("headend.collect")

DAY = 86400


@dataclass(frozen=True)
class CollectPolicy:
    every: float = 3600.0        # look at a meter at least this often, s
    settle: int = 120            # an interval is expected this long after it closed, s
    backfill: int = DAY          # history expected from a newly seen meter, s
    backoff: float = 300.0       # first wait after a failed read, doubling
    backoff_max: float = 6 * 3600.0
    daily_budget: int = 48       # collection reads per meter per day
    max_span: int = 2 * DAY      # longest range in one request
    tolerance: int = 60          # delay tolerance of collection reads: DAPs may aggregate

    def __post_init__(self) -> None:
        if self.every <= 0 or self.backoff <= 0 or self.daily_budget < 1 or self.max_span < 900:
            raise ValueError("collection policy: every/backoff > 0, budget >= 1, max_span >= 900")
        if not 0 <= self.tolerance <= 3600:
            raise ValueError("collection policy: tolerance is 0 to 3600 s")


@dataclass(frozen=True)
class Planned:
    meter: int
    start: int
    end: int
    reason: str  # "collect" (the newest rows), "gap" (a hole), "catch-up" (new session)


def missing_ranges(held: list[int], since: int, until: int, period: int,
                   max_span: int) -> list[tuple[int, int]]:
    """The ranges [start, end) of the grid since..until (both on period
    boundaries) with no held row, each at most max_span long."""
    out: list[tuple[int, int]] = []
    have = set(held)
    t = since
    while t < until:
        if t in have:
            t += period
            continue
        start = t
        while t < until and t not in have and t - start < max_span:
            t += period
        out.append((start, t))
    return out


class Collector:
    def __init__(self, store: Store, policy: CollectPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or CollectPolicy()
        self._catch_up: set[int] = set()
        # Collection reads not yet finished, per meter: while one is in
        # flight the meter is not looked at again (its answer may be what
        # fills the gap).
        self.inflight: dict[int, int] = {}

    def _last_closed(self, now: float, period: int) -> int:
        return int(now - self.policy.settle) // period * period

    def on_birth(self, meter: int, prev_session: int | None, session: int, oldest: int,
                 now: float) -> None:
        """A meter said hello. A new session (or a first one) means it may
        have missed reads: look at it now."""
        p = self.policy
        row = self.store.collection(meter)
        mrow = self.store.meter(meter)
        period = mrow.period if mrow else 900
        if row is None:
            since = max(oldest, int(now) - p.backfill) // period * period
            self.store.set_collection(meter, since, now, 0, int(now) // DAY, 0)
        elif prev_session != session:
            since, _, failures, day, reads = row
            self.store.set_collection(meter, since, now, 0, day, reads)
            self._catch_up.add(meter)

    def on_result(self, meter: int, ok: bool, now: float, no_data_oldest: int | None = None) -> None:
        """The outcome of a collection read: reset or lengthen the backoff.
        `no_data_oldest`: the meter no longer holds anything before this."""
        n = self.inflight.get(meter, 0) - 1
        if n > 0:
            self.inflight[meter] = n
        else:
            self.inflight.pop(meter, None)
        row = self.store.collection(meter)
        if row is None:
            return
        since, next_at, failures, day, reads = row
        if no_data_oldest:
            since = max(since, no_data_oldest)
        if ok:
            failures = 0
        else:
            failures += 1
            wait = min(self.policy.backoff * 2 ** (failures - 1), self.policy.backoff_max)
            next_at = max(next_at, now + wait)
        self.store.set_collection(meter, since, next_at, failures, day, reads)

    def due(self, now: float, limit: int = 1000) -> list[Planned]:
        """The reads to issue now (at most `limit`), and the bookkeeping that
        they were issued. Every registered meter is expected to report: one
        never heard from is read too (its birth may have come before the
        head-end first subscribed), with backoff while it does not answer.
        A meter known to be offline (its last word was a death) is skipped
        until its next birth, except for one probe per backoff_max."""
        p = self.policy
        today = int(now) // DAY
        online = self.store.online()
        cols = self.store.collections()
        out: list[Planned] = []
        for m in self.store.meters():
            meter, period = m.meter, m.period
            if len(out) >= limit:
                break
            if self.inflight.get(meter):
                continue
            col = cols.get(meter)
            if col is None:
                col = (max(0, int(now) - p.backfill) // period * period, now, 0, today, 0)
            since, next_at, failures, day, reads = col
            if next_at > now:
                continue
            if not online.get(meter) and m.session is not None and now - next_at < p.backoff_max:
                continue  # said goodbye: wait for its birth (or the next probe)
            if day != today:
                day, reads = today, 0
            until = self._last_closed(now, period)
            gaps = missing_ranges(self.store.interval_starts(meter, since, until),
                                  since, until, period, p.max_span)
            catch_up = meter in self._catch_up
            self._catch_up.discard(meter)
            issued = 0
            for start, end in gaps:
                if reads >= p.daily_budget:
                    log.warning("meter %d: daily read budget (%d) spent; %d range(s) left "
                                "for tomorrow", meter, p.daily_budget, len(gaps) - issued)
                    break
                if catch_up:
                    reason = "catch-up"
                elif end == until:
                    reason = "collect"  # the newest rows (after an outage, all since it)
                else:
                    reason = "gap"      # a hole with stored rows after it
                out.append(Planned(meter, start, end, reason))
                reads += 1
                issued += 1
            if issued:
                self.inflight[meter] = self.inflight.get(meter, 0) + issued
            self.store.set_collection(meter, since, now + p.every, failures, day, reads)
        return out

    def success(self, day_start: int, now: float, meters: list[int] | None = None
                ) -> dict[int, tuple[int, int]]:
        """Read success per meter for the UTC day starting at day_start:
        meter -> (intervals stored, intervals expected)."""
        out: dict[int, tuple[int, int]] = {}
        cols = self.store.collections()
        for m in self.store.meters():
            if meters is not None and m.meter not in meters:
                continue
            col = cols.get(m.meter)
            if col is None:
                out[m.meter] = (0, 0)
                continue
            lo = max(col[0], day_start)
            hi = min(day_start + DAY, self._last_closed(now, m.period))
            expected = max(0, (hi - lo) // m.period) if hi > lo else 0
            held = len(self.store.interval_starts(m.meter, lo, hi)) if expected else 0
            out[m.meter] = (held, expected)
        return out
