# Power loss at every flash write step: the uplink counter never repeats,
# the load profile is never corrupted, the downlink replay state never goes
# backwards, and the outbox keeps every response until its PUBACK.
#
# A meter lives through a realistic run (intervals closing across segment
# boundaries, requests and responses across several counter blocks,
# reconnects, an outbox that fills while the broker is away). Its flash is a
# stand-in with the calls of firmware/flash.py that can cut the power at any
# write step N, leaving a prefix of the bytes being written. For every N
# and several prefix lengths, a fresh Meter boots from what that flash would
# hold and is checked. Two ways to get there, held to the same bytes:
#
#   observe  one run; before each write step the flash hands its contents,
#            with that step cut short, to a check. Up to step N the run is
#            exactly the run that loses power at N, so this covers every N
#            in one pass.
#   cut      the run is started again and the flash raises PowerCut at
#            step N (the plain power cut), for a sample of N: the flash it
#            leaves must be the one `observe` checked.
#
# tests/test_micropython.py runs the test_* functions here under MicroPython
# (a shorter run) and CPython; tests/test_power_loss.py runs the full size on
# CPython and reports the flash writes per simulated day.
import hashlib
import os
import sys

from firmware.meter import Meter
from firmware.metrology import SimulatedLoad
from firmware.outbox import Outbox
from shared import backend as _backends
from shared.backend import Backend
from shared.channel import Channel
from shared.const import DOWN, T_READ_CURRENT, T_READ_INTERVAL

MICROPYTHON = sys.implementation.name == "micropython"
BASE = _backends.PURE if MICROPYTHON else (_backends.NATIVE or _backends.PURE)

METER = 4242
KEY = bytes(range(32))  # the pairwise key (what box.beforenm would give)
SEED = 77
PERIOD = 900
T0 = 1750000000 - 1750000000 % PERIOD + 80 * PERIOD  # interval 80 of a segment
OUTBOX_MAX = 12
# Flash writes in one simulated day (96 intervals and a day of requests), at
# most: see docs/firmware.md, "Flash wear".
WRITES_PER_DAY_BUDGET = 160
BYTES_PER_DAY_BUDGET = 24 * 1024


class PowerCut(Exception):
    pass


class CutFlash:
    """firmware.flash.Flash's calls, in RAM. Every write, append and remove
    is one step. With cut_at=N, step N keeps only `keep` bytes of its data
    (a remove does not happen) and raises PowerCut. With an observer, it is
    called before each step as observer(step, kind, name, data)."""

    def __init__(self, files=None, cut_at=None, keep=0, observer=None):
        self.files = dict(files or {})
        self.cut_at = cut_at
        self.keep = keep
        self.observer = observer
        self.step = 0
        self.writes = 0
        self.bytes_written = 0

    def _next(self, kind, name, data):
        self.step += 1
        if self.observer is not None:
            self.observer(self.step, kind, name, data)
        return self.step == self.cut_at

    def read(self, name):
        return self.files.get(name)

    def write(self, name, data):
        data = bytes(data)
        if self._next("write", name, data):
            self.files[name] = data[:self.keep]
            raise PowerCut()
        self.writes += 1
        self.bytes_written += len(data)
        self.files[name] = data

    def append(self, name, data):
        data = bytes(data)
        if self._next("append", name, data):
            self.files[name] = self.files.get(name, b"") + data[:self.keep]
            raise PowerCut()
        self.writes += 1
        self.bytes_written += len(data)
        self.files[name] = self.files.get(name, b"") + data

    def remove(self, name):
        if self._next("remove", name, None):
            raise PowerCut()
        self.files.pop(name, None)

    def names(self):
        return list(self.files)


def after_cut(files, kind, name, data, keep):
    """What the flash holds if power fails during this step, `keep` bytes in."""
    out = dict(files)
    if kind == "write":
        out[name] = data[:keep]
    elif kind == "append":
        out[name] = out.get(name, b"") + data[:keep]
    return out


def prefixes(n, level):
    """Prefix lengths to try for a write of n bytes: level 0 none, half and
    all of it; 1 also one byte and all but one; 2 every length of a write
    up to 40 bytes (every state, profile and forget record)."""
    if n is None:
        return (0,)
    if level >= 2 and n <= 40:
        return tuple(range(n + 1))
    if level >= 1:
        return tuple(sorted(set((0, 1, n // 2, n - 1, n))))
    return tuple(sorted(set((0, n // 2, n))))


def recording(counters):
    """The backend, noting the counter of every message it seals."""

    def seal(key, nonce, pt):
        counters.append(BASE.loads(pt, 4096, True)[4])
        return BASE.seal(key, nonce, pt)

    return Backend(BASE.name, BASE.dumps, BASE.loads, BASE.beforenm, seal, BASE.open,
                   BASE.public_key)


class Urandom:
    """Deterministic 'random' bytes, so that a rerun writes the same flash."""

    def __init__(self, seed):
        self.n = 0
        self.seed = seed

    def __call__(self, k):
        out = b""
        while len(out) < k:
            self.n += 1
            out += hashlib.sha256(b"%d/%d" % (self.seed, self.n)).digest()
        return out[:k]


class _Up:
    def __init__(self):
        self.n = 10 ** 6

    def next(self):
        self.n += 1
        return self.n


class _Down:
    def __init__(self, start):
        self.n = start

    def next(self):
        v = self.n
        self.n += 1
        return v


_ROWS = {}


def expected_row(k):
    """(import, export) the profile must hold for interval k: the registers
    at installation plus every interval the simulated load produced since."""
    start = T0 // PERIOD
    if not _ROWS:
        _ROWS[start - 1] = SimulatedLoad(SEED, PERIOD).initial()
    if k not in _ROWS:
        src = SimulatedLoad(SEED, PERIOD)
        j = max(_ROWS)
        imp, exp = _ROWS[j]
        while j < k:
            j += 1
            di, de = src.interval(j)
            imp = (imp + di) & 0xFFFFFFFF
            exp = (exp + de) & 0xFFFFFFFF
            _ROWS[j] = (imp, exp)
    return _ROWS[k]


class Life:
    """One meter's run on `flash`: `steps` steps of `step_s` seconds from
    T0. Every step closes what ended; some bring a request; every 40th the
    meter reconnects; from step `away` for `away_len` steps the broker is
    gone and the outbox only fills."""

    def __init__(self, flash, steps, step_s=PERIOD // 3, seed=1):
        self.flash = flash
        self.steps = steps
        self.step_s = step_s
        self.urandom = Urandom(seed)
        self.sealed = []
        self.backend = recording(self.sealed)
        self.head = Channel(BASE, KEY, METER, DOWN, _Down(1))
        self.away = steps // 2
        self.away_len = max(6, steps // 12)
        # What had completed when a write step started:
        self.rows_done = -1
        self.down_done = -1
        self.session_done = 0
        self.accepted = []       # request envelopes the meter accepted
        self.ob = None
        self.ob_before = []      # outbox entries before the operation under way
        self.pending = []        # outbox contents seen by checks during it
        self.in_ob = False
        self.now = T0
        self.meter = None
        self.checks = 0

    def items(self):
        return [(s, p) for s, p in self.ob.items] if self.ob is not None else []

    def _ob(self, fn, *args):
        self.ob_before = self.items()
        self.in_ob = True
        out = fn(*args)
        self.in_ob = False
        after = self.items()
        for got in self.pending:
            if got != self.ob_before and got != after:
                raise AssertionError("outbox after a cut holds %r, neither before %r nor after %r"
                                     % ([s for s, _ in got], [s for s, _ in self.ob_before],
                                        [s for s, _ in after]))
        self.pending = []
        self.ob_before = after
        return out

    def request(self, i):
        now = self.now
        if i % 4 == 1:
            body = [i, now + 600, 60, now - 6 * 3600, now]
            _, wire = self.head.seal(T_READ_INTERVAL, body, self.urandom(24))
        else:
            _, wire = self.head.seal(T_READ_CURRENT, [i, now + 600, 60], self.urandom(24))
        return wire

    def run(self):
        self.meter = m = Meter(METER, KEY, self.backend, self.flash,
                               SimulatedLoad(SEED, PERIOD), PERIOD)
        self.ob = Outbox(self.flash, max_items=OUTBOX_MAX)
        self.ob_before = self.items()
        for i in range(self.steps):
            self.now = T0 + i * self.step_s
            m.catch_up(self.now)
            self.rows_done = m.profile.last
            if i % 40 == 0:
                m.connect(self.now, self.urandom)
                self.session_done = m.state.session
            if i % 3 == 0 or i % 7 == 0:
                wire = self.request(i)
                for resp in m.handle(wire, self.now, self.urandom):
                    self._ob(self.ob.push, resp)
                if m.channel.window.top != self.down_done:
                    self.accepted.append(wire)
                self.down_done = m.channel.window.top
            if i % 11 == 5 and self.accepted:
                if m.handle(self.accepted[-1], self.now, self.urandom):
                    raise AssertionError("a replayed request was answered")
            if not self.away <= i < self.away + self.away_len:
                for _ in range(3):
                    head = self.ob.peek()
                    if head is None:
                        break
                    self._ob(self.ob.ack, head[0])
        return self

    # -- the check of one cut -------------------------------------------------

    def check(self, files):
        """Boot a fresh meter from `files` (the flash after a cut) and check
        everything it must have kept."""
        self.checks += 1
        flash = CutFlash(files)
        sealed2 = []
        m = Meter(METER, KEY, recording(sealed2), flash, SimulatedLoad(SEED, PERIOD), PERIOD)
        prof = m.profile
        start = T0 // PERIOD
        if self.rows_done < 0:
            if prof.last not in (-1, start - 1):
                raise AssertionError("profile appeared from nowhere: %d" % prof.last)
        else:
            if not self.rows_done <= prof.last <= self.rows_done + 1:
                raise AssertionError("profile ends at %d, %d rows were written"
                                     % (prof.last, self.rows_done))
        if prof.last >= 0:
            if prof.first != start - 1:
                raise AssertionError("profile lost its oldest rows: starts at %d, not %d"
                                     % (prof.first, start - 1))
            for k in range(prof.first, prof.last + 1):
                imp, exp, flags = prof.row(k)
                if (imp, exp) != expected_row(k) or flags:
                    raise AssertionError("profile row %d is %r, the load was %r"
                                         % (k, (imp, exp, flags), expected_row(k)))
        if m.state.session < self.session_done:
            raise AssertionError("session went back from %d to %d"
                                 % (self.session_done, m.state.session))
        top = m.channel.window.top
        if top < self.down_done:
            raise AssertionError("downlink replay top went back from %d to %d"
                                 % (self.down_done, top))
        used = self.sealed
        hi = max(used) if used else -1
        if m.channel.counter.peek() <= hi:
            raise AssertionError("uplink counter resumes at %d, %d was used"
                                 % (m.channel.counter.peek(), hi))
        now = self.now + 60
        for wire in self.accepted[-2:]:
            if m.handle(wire, now, os.urandom):
                raise AssertionError("a request accepted before the cut was answered again")
        ob = Outbox(flash, max_items=OUTBOX_MAX)
        got = [(s, p) for s, p in ob.items]
        if self.in_ob:
            self.pending.append(got)  # judged when the operation completes
        elif got != self.items():
            raise AssertionError("outbox after a cut holds %r, not %r"
                                 % ([s for s, _ in got], [s for s, _ in self.items()]))
        # The meter goes on: a new session and a fresh request are served,
        # and none of its counters was used before the cut.
        m.connect(now, os.urandom)
        head = Channel(BASE, KEY, METER, DOWN, _Down(10 ** 6 + self.checks))
        _, req = head.seal(T_READ_CURRENT, [1, now + 600, 60], os.urandom(24))
        if len(m.handle(req, now, os.urandom)) != 1:
            raise AssertionError("the rebooted meter did not answer a fresh request")
        for c in sealed2:
            if c <= hi:
                raise AssertionError("uplink counter %d reused after the cut" % c)
        if len(set(sealed2)) != len(sealed2):
            raise AssertionError("uplink counter repeated after the cut")


def sweep(steps, level, sample=23, check=True):
    """Run once, checking a power cut at every write step and prefix.
    Returns (life, write steps, cuts checked, {step: {keep: flash}}) with
    the flash of every `sample`th step kept for cut_runs()."""
    seen = {}
    holder = []

    def observer(step, kind, name, data):
        life = holder[0]
        n = None if data is None else len(data)
        for keep in prefixes(n, level):
            files = after_cut(flash.files, kind, name, data, keep)
            if step % sample == 0 and keep in prefixes(n, 1):
                seen.setdefault(step, {})[keep] = files
            if check:
                life.check(files)

    flash = CutFlash(observer=observer)
    life = Life(flash, steps)
    holder.append(life)
    life.run()
    return life, flash.step, life.checks, seen


def cut_runs(steps, seen):
    """The plain power cut, for the sampled steps: the flash it leaves must be
    the one the sweep checked."""
    n = 0
    for step in sorted(seen):
        for keep, files in seen[step].items():
            flash = CutFlash(cut_at=step, keep=keep)
            try:
                Life(flash, steps).run()
            except PowerCut:
                pass
            else:
                raise AssertionError("the run ended before write step %d" % step)
            if flash.files != files:
                raise AssertionError("a power cut at step %d (%d bytes in) left other bytes "
                                     "than the sweep checked" % (step, keep))
            n += 1
    return n


def writes_per_day():
    """(writes, bytes) of the second simulated day: 96 intervals, 4 current
    reads, one daily interval read and one reconnect, every response sent."""
    flash = CutFlash()
    urandom = Urandom(9)
    m = Meter(METER, KEY, BASE, flash, SimulatedLoad(SEED, PERIOD), PERIOD)
    ob = Outbox(flash)
    head = Channel(BASE, KEY, METER, DOWN, _Down(1))
    day = 86400
    marks = []
    for d in range(3):
        marks.append((flash.writes, flash.bytes_written))
        for i in range(96):
            now = T0 + d * day + i * PERIOD + 30
            m.catch_up(now)
            if i == 8:
                m.connect(now, urandom)
            if i in (2, 30, 50, 70, 4):
                if i == 4:
                    body = [i, now + 600, 60, now - day, now]
                    wire = head.seal(T_READ_INTERVAL, body, urandom(24))[1]
                else:
                    wire = head.seal(T_READ_CURRENT, [i, now + 600, 60], urandom(24))[1]
                for resp in m.handle(wire, now, urandom):
                    ob.push(resp)
                while ob.peek() is not None:
                    ob.ack(ob.peek()[0])
    marks.append((flash.writes, flash.bytes_written))
    # day 0 is the first boot; the steady state is the mean of days 1 and 2
    writes = (marks[3][0] - marks[1][0]) // 2
    nbytes = (marks[3][1] - marks[1][1]) // 2
    return writes, nbytes


# -- under MicroPython (and CPython): a shorter run ---------------------------------


def test_power_cut_at_every_write_step():
    # 330 steps of 300 s: 110 intervals (from interval 80 of a segment, so
    # one segment boundary), ~40 messages (two counter blocks).
    life, steps, checks, seen = sweep(330, 0)
    if life.meter.profile.last - T0 // PERIOD < 100:
        raise AssertionError("the run closed too few intervals")
    if len(life.sealed) < 40:
        raise AssertionError("the run sealed too few messages: %d" % len(life.sealed))
    if checks < steps:
        raise AssertionError("not every step was checked")
    print("power_loss(mpy-sized): %d write steps, %d cuts checked" % (steps, checks))


def test_power_cut_really_cut():
    _, _, _, seen = sweep(120, 1, sample=19, check=False)
    few = {}
    for step in sorted(seen)[:4]:
        few[step] = seen[step]
    if cut_runs(120, few) < 8:
        raise AssertionError("too few cut runs")


def test_writes_per_day_within_budget():
    writes, nbytes = writes_per_day()
    print("flash writes per day: %d calls, %d bytes" % (writes, nbytes))
    if writes > WRITES_PER_DAY_BUDGET or nbytes > BYTES_PER_DAY_BUDGET:
        raise AssertionError("flash writes per day %d (%d bytes) over the budget %d (%d)"
                             % (writes, nbytes, WRITES_PER_DAY_BUDGET, BYTES_PER_DAY_BUDGET))
