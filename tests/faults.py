"""A fault-injection rig for the exactly-once tests (tests/test_faults.py).

One whole provisioned system on this machine, under steady load:

- a real broker (Mosquitto or amqtt, tests/brokers.py) with the site's
  accounts and ACLs;
- the real DAPs (`python -m dap`) as subprocesses, in aggregate mode;
- the head-end (headend.service.HeadEnd) in this process, with scheduled
  collection (CollectPolicy) doing the reading;
- 200+ host meters (sim.fleet.Fleet: the firmware meter core over
  paho-mqtt, one thread), some behind the DAPs and some direct.

Time is a `SimClock` shared by the Fleet and the head-end: simulated time
runs `speed` times faster than real time, so a 15-minute interval closes
every 900/speed real seconds and the head-end collects it from every meter.
The DAPs and the brokers run on real time (their windows, ack timeouts and
drain rates are real seconds).

After a fault the rig waits (no timing assertions: generous deadlines) until
the head-end holds everything that was due when the fault ended, then brings
the run to a clean end: the clock slows down so that the collector looks at
every meter once more after the last interval has settled, and stops just
before the meters would close another interval. `verify()` then compares
the store with every meter's own profile and with the simulated metrology
(firmware.metrology.SimulatedLoad: the ground truth), value for value.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware.metrology import SimulatedLoad
from headend import provision
from headend.collect import DAY, Collector, CollectPolicy
from headend.config import HeadEndConfig
from headend.requests import ReadSpec
from headend.service import HeadEnd
from headend.store import Store
from shared import obis, topics
from sim.fleet import Fleet
from tests.brokers import Broker, start_broker
from tests.dap_helpers import DapProcess
from tests.waits import wait_until

PERIOD = 900
IMPORT, EXPORT = obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT
# Monday 2 March 2026, 06:00 UTC: the simulated run starts here.
SIM_START = 1772431200


class MeterLostOffline(AssertionError):
    """A meter is connected to the broker but the head-end holds it for
    offline, so the collector will never read it again: the wait can only
    time out. Raised at once instead (see Rig.lost_meters)."""


# -- the clock ------------------------------------------------------------------


class SimClock:
    """Simulated epoch seconds: `start` at creation, then running `speed`
    times faster than real time. Monotonic across speed changes; speed 0
    stops it."""

    def __init__(self, start: float, speed: float) -> None:
        self._lock = threading.Lock()
        self._sim = float(start)
        self._real = time.monotonic()
        self._speed = float(speed)

    def __call__(self) -> float:
        with self._lock:
            return self._sim + (time.monotonic() - self._real) * self._speed

    @property
    def speed(self) -> float:
        return self._speed

    def set(self, speed: float, at: float | None = None) -> float:
        """Run at `speed` from now on (from `at`, if later than now)."""
        with self._lock:
            now = self._sim + (time.monotonic() - self._real) * self._speed
            self._sim = max(now, at) if at is not None else now
            self._real = time.monotonic()
            self._speed = float(speed)
            return self._sim

    def stop(self, at: float | None = None) -> float:
        return self.set(0.0, at)


# -- processes and observers ------------------------------------------------------


class DapProc(DapProcess):
    """A rig's DAP (tests/dap_helpers.DapProcess), with its id and state
    folder, for the queue's own view."""

    def __init__(self, dap: int, config: Path, log: Path, state_dir: Path) -> None:
        super().__init__(config, log)
        self.dap, self.state_dir = dap, state_dir

    def stop(self, timeout: float = 20.0) -> None:
        """At teardown: a DAP that does not stop on SIGTERM is killed
        (DapProcess.stop does so, then raises), and the case is judged by
        its counts, not by this."""
        if self.running():
            try:
                super().stop(timeout)
            except AssertionError:
                pass

    def recovery_lines(self) -> list[tuple[int, int, int]]:
        """(envelopes, not in a bundle, bundles to (re)send) from each start's
        'queue ...' line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [(int(a), int(b), int(c)) for a, b, c in re.findall(
            r"(\d+) envelopes, (\d+) of them not in a bundle, (\d+) bundles to", text)]

    def _read_queue(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        """query() on the DAP's disk queue, with a connection of our own
        (WAL: it does not block the DAP), so committed state only; None
        while there is no queue or it cannot be read."""
        path = self.state_dir / "queue.sqlite3"
        if not path.exists():
            return None
        try:
            db = sqlite3.connect(path, timeout=5, isolation_level=None)
            try:
                return query(db)
            finally:
                db.close()
        except sqlite3.Error:
            return None

    def bundle_seqs(self) -> set[int] | None:
        """The sequence numbers of the bundles the queue holds (unacknowledged)."""
        return self._read_queue(
            lambda db: {seq for (seq,) in db.execute("SELECT seq FROM bundles")})

    def queue_state(self) -> dict[str, int] | None:
        """What the DAP's disk queue holds: envelopes, envelopes not yet in
        a bundle, bundles not acknowledged."""
        def query(db: sqlite3.Connection) -> dict[str, int]:
            env, free = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bundle IS NULL), 0) FROM envelopes").fetchone()
            bundles = db.execute("SELECT COUNT(*) FROM bundles").fetchone()[0]
            return {"envelopes": int(env), "unbundled": int(free), "bundles": int(bundles)}
        return self._read_queue(query)


class Observer:
    """The head-end's account on a second connection: records every DAP's
    retained status (d<k>/state) and, on Mosquitto, the broker's count of
    dropped messages ($SYS)."""

    def __init__(self, broker: Broker, password: str, client_id: str, sys_topics: bool,
                 daps: tuple[int, ...] = ()) -> None:
        self.lock = threading.Lock()
        self.states: dict[int, list[tuple[float, dict]]] = {}
        self.sys: dict[str, int] = {}
        self.bundles: dict[int, list[bytes]] = {}  # dap -> the last bundles it published
        self.ready = threading.Event()
        subs = [("+/state", 1)] + [(topics.dap_up(d), 1) for d in daps]
        if sys_topics:
            subs.append(("$SYS/broker/publish/messages/dropped", 0))
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        self.c.username_pw_set(topics.HEADEND, password)
        self.c.reconnect_delay_set(0.2, 2)
        self.c.on_message = self._msg
        self.c.on_connect = lambda c, *a: c.subscribe(subs)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        assert self.ready.wait(20), "the observer could not subscribe"

    def _msg(self, c, userdata, msg) -> None:
        if msg.topic.startswith("$SYS/"):
            try:
                with self.lock:
                    self.sys[msg.topic] = int(msg.payload)
            except ValueError:
                pass
            return
        try:
            leaf, _, dap = topics.parse(msg.topic)
        except Exception:
            return
        if dap is None:
            return
        if leaf == "up":
            with self.lock:
                kept = self.bundles.setdefault(dap, [])
                kept.append(bytes(msg.payload))
                del kept[:-20]
            return
        try:
            state = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.states.setdefault(dap, []).append((time.monotonic(), state))

    def state(self, dap: int) -> dict:
        with self.lock:
            got = self.states.get(dap)
            return got[-1][1] if got else {}

    def history(self, dap: int, since: float = 0.0) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, s) for t, s in self.states.get(dap, []) if t >= since]

    def last_bundle(self, dap: int) -> bytes | None:
        with self.lock:
            got = self.bundles.get(dap)
            return got[-1] if got else None

    def dropped(self) -> int | None:
        with self.lock:
            return self.sys.get("$SYS/broker/publish/messages/dropped")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# -- the head-end as the tests run it -----------------------------------------------


# -- the rig -----------------------------------------------------------------------------


@dataclass
class RigConfig:
    kind: str                                   # "mosquitto" or "amqtt"
    daps: dict[int, range] = field(default_factory=lambda: {
        1: range(1001, 1081), 2: range(2001, 2071)})
    direct: range = range(3001, 3061)
    speed: float = 450.0                        # simulated seconds per real second
    # collection reads carry a 1 s delay tolerance (the DAP reads it in real
    # seconds): an aggregating DAP really buffers them
    policy: CollectPolicy = field(default_factory=lambda: CollectPolicy(
        every=600, settle=60, backfill=2 * 3600, backoff=300, backoff_max=1800,
        daily_budget=400, max_span=DAY, tolerance=1))
    budget: dict[str, int] = field(default_factory=lambda: {"A": 1800, "B": 2700})
    retries: int = 1
    dap_window: float = 3.0
    dap_max_items: int = 500
    ack_timeout: float = 3.0
    drain_rate: float = 20.0
    history_days: float = 0.5
    default_queue_limits: bool = False          # Mosquitto: 1000 queued, 20 in flight

    @property
    def meters(self) -> list[int]:
        return [m for ids in self.daps.values() for m in ids] + list(self.direct)


class Rig:
    def __init__(self, workdir: Path, cfg: RigConfig) -> None:
        self.workdir = Path(workdir)
        self.cfg = cfg
        self.site = self.workdir / "site"
        self.clock = SimClock(SIM_START, cfg.speed)
        self.broker: Broker | None = None
        self.daps: dict[int, DapProc] = {}
        self.he: HeadEnd | None = None
        self.retired: list[HeadEnd] = []   # head-ends stopped during the run
        self.fleet: Fleet | None = None
        self.observer: Observer | None = None
        self.store: Store | None = None
        self.since: dict[int, int] = {}
        self.t_load = 0.0                       # sim time the meters came up
        self._offline_since: dict[int, float] = {}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- bring-up --------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        provision.init(self.site)
        for dap in cfg.daps:
            provision.add_dap(self.site, dap, "aggregate")
        for dap, ids in cfg.daps.items():
            provision.add_meters(self.site, list(ids), dap=dap, group=dap)
        provision.add_meters(self.site, list(cfg.direct), group=99)
        self.broker = start_broker(cfg.kind, self.workdir / "broker",
                                   layout=provision.layout(self.site),
                                   accounts=provision.accounts(self.site))
        if cfg.kind == "mosquitto":
            self._tune_mosquitto()
        hcfg = HeadEndConfig.load(self.site)
        self.hcfg = hcfg
        self.settings = dataclasses.replace(hcfg.broker, port=self.broker.port)
        self.observer = Observer(self.broker, self.settings.password or "", "headend-faults",
                                 sys_topics=cfg.kind == "mosquitto", daps=tuple(cfg.daps))
        for dap in cfg.daps:
            self.daps[dap] = self._dap(dap).start()
        wait_until(lambda: all(self.observer.state(d).get("state") == "online"
                               for d in cfg.daps), 30, "the DAPs to report online",
                   diagnose=lambda: "\n".join(p.log() for p in self.daps.values()))
        self.store = Store(hcfg.db)
        self.he = self.new_headend().start()
        self.fleet = Fleet(clock=self.clock, host=self.broker.host, port=self.broker.port)
        for m in cfg.meters:
            text = (self.site / "meters" / topics.meter_name(m) / "meter.json").read_text()
            self.fleet.add(text, history_days=cfg.history_days)
        self.t_load = self.clock()
        self.fleet.start()
        n = len(cfg.meters)
        wait_until(lambda: self.online() == n, 90, f"{n} meters online",
                   diagnose=lambda: f"{self.online()} online")
        wait_until(lambda: len(self.store.collections()) == n, 30,
                   "a collection schedule for every meter")
        self.since = {m: row[0] for m, row in self.store.collections().items()}

    def _tune_mosquitto(self) -> None:
        """$SYS every second, readable by the head-end's account (to count
        what the broker drops); optionally Mosquitto's default queue limits."""
        assert self.broker is not None
        conf = self.broker.conf
        text = conf.read_text()
        if self.cfg.default_queue_limits:
            # Mosquitto's defaults: the lines our generator writes, removed.
            text = re.sub(r"^max_queued_messages .*$", "# max_queued_messages: default (1000)",
                          text, flags=re.M)
            text = re.sub(r"^max_inflight_messages .*$",
                          "# max_inflight_messages: default (20)", text, flags=re.M)
        text += "\nsys_interval 1\n"
        conf.write_text(text)
        acl = conf.parent / "acl"
        lines = acl.read_text().splitlines()
        at = lines.index(f"user {topics.HEADEND}")
        lines.insert(at + 1, "topic read $SYS/broker/publish/messages/dropped")
        acl.write_text("\n".join(lines) + "\n")
        self.broker.restart()

    def _dap(self, dap: int) -> DapProc:
        cfg = self.cfg
        home = self.site / "daps" / topics.dap_name(dap)
        state = home / "state"
        toml = home / "faults.toml"
        assert self.broker is not None
        toml.write_text(f"""dap = {dap}
mode = "aggregate"
state_dir = "{state}"

[meters_broker]
host = "{self.broker.host}"
port = {self.broker.port}
username = "{topics.dap_name(dap)}"
password_file = "{home / 'password'}"

[aggregate]
window = {cfg.dap_window}
max_items = {cfg.dap_max_items}
max_bytes = 262144

[queue]
ack_timeout = {cfg.ack_timeout}
drain_rate = {cfg.drain_rate}
sync = "full"

[log]
level = "INFO"
stats_interval = 0.5
""")
        return DapProc(dap, toml, self.workdir / f"dap{dap}.log", state)

    def new_headend(self) -> HeadEnd:
        return HeadEnd(self.hcfg.db, self.hcfg.secret_key, self.settings,
                       retries=self.cfg.retries, collect=self.cfg.policy, clock=self.clock,
                       budget=self.cfg.budget)

    def restart_headend(self, down: float, while_down: Callable[[], None] | None = None
                        ) -> None:
        """Stop the head-end, keep it down `down` real seconds, then start a
        new one on the same store with the same client id."""
        assert self.he is not None
        self.he.stop()
        self.retired.append(self.he)
        self.he = None
        end = time.monotonic() + down
        while time.monotonic() < end:
            if while_down is not None:
                while_down()
            time.sleep(0.1)
        self.he = self.new_headend().start()

    # -- what the store says -------------------------------------------------------------

    def online(self) -> int:
        assert self.store is not None
        return self.store.online_count()

    def held(self, until: int) -> dict[int, int]:
        """Per meter: intervals [since, until) held (import rows)."""
        assert self.store is not None
        rows = self.store.db.execute(
            "SELECT meter, start FROM readings WHERE quantity = ? AND start < ?",
            (IMPORT, until)).fetchall()
        out: Counter[int] = Counter()
        for m, start in rows:
            if start >= self.since.get(m, 1 << 62):
                out[m] += 1
        return out

    def missing(self, until: int) -> dict[int, int]:
        """Per meter with a gap: intervals [since, until) not held."""
        held = self.held(until)
        out = {}
        for m, since in self.since.items():
            want = max(0, (until - since) // PERIOD)
            if held.get(m, 0) < want:
                out[m] = want - held.get(m, 0)
        return out

    def lost_meters(self, grace: float = 20.0) -> None:
        """MeterLostOffline if a meter connected to the broker has been held
        for offline by the head-end for longer than `grace` real seconds:
        the collector never reads an offline meter, so nothing more of its
        readings will be collected."""
        assert self.store is not None and self.fleet is not None
        now = time.monotonic()
        offline = {m for (m,) in self.store.db.execute(
            "SELECT meter FROM meters WHERE online = 0")}
        both = {m for m in offline if self.fleet.meters[m].connected}
        for m in list(self._offline_since):
            if m not in both:
                del self._offline_since[m]
        for m in both:
            self._offline_since.setdefault(m, now)
        stuck = sorted(m for m, t in self._offline_since.items() if now - t > grace)
        if not stuck:
            return
        rows = self.store.db.execute(
            "SELECT meter, session, online FROM meters WHERE meter IN (%s)"
            % ",".join("?" * len(stuck)), stuck).fetchall()
        raise MeterLostOffline(
            f"{len(stuck)} meter(s) connected for over {grace:.0f} s but offline at the "
            f"head-end, so never collected again: (meter, session, online) {rows[:10]}; "
            f"their own sessions: "
            f"{[(m, self.fleet.meters[m].core.state.session) for m in stuck[:10]]}")

    def last_closed(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        return int(now - self.cfg.policy.settle) // PERIOD * PERIOD

    def success(self, now: float | None = None) -> tuple[int, int]:
        """(intervals stored, expected) over all meters and every UTC day of
        the run, as the head-end's Collector.success counts them."""
        assert self.store is not None
        now = self.clock() if now is None else now
        col = Collector(self.store, self.cfg.policy)
        held = expected = 0
        first = min(self.since.values()) // DAY * DAY
        for day in range(first, int(now) // DAY * DAY + 1, DAY):
            for h, e in col.success(day, now).values():
                held += h
                expected += e
        return held, expected

    def collect_reads(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for he in [*self.retired, *([self.he] if self.he else [])]:
            out.update(he.collect_reads)
        return dict(out)

    def totals(self) -> Counter:
        out: Counter = Counter()
        for he in [*self.retired, *([self.he] if self.he else [])]:
            out.update(he.ingest.totals)
        return out

    def pending(self) -> int:
        return len(self.he._pending) if self.he is not None else 0

    # -- phases ---------------------------------------------------------------------------

    def steady(self, intervals: int, timeout: float = 60) -> None:
        """Let the load run until `intervals` more intervals have been closed
        and collected everywhere (the backlog of the first births included)."""
        target = self.last_closed() + intervals * PERIOD
        wait_until(lambda: self.last_closed() >= target and not self.missing(target - PERIOD),
                   timeout, "steady collection",
                   diagnose=lambda: f"missing: {self._gaps(target - PERIOD)}",
                   fail=self.lost_meters)

    def converge(self, until: int, timeout: float) -> float:
        """Wait until every interval before `until` is stored; returns the
        real seconds it took."""
        t0 = time.monotonic()
        wait_until(lambda: not self.missing(until), timeout,
                   f"the head-end to hold every interval before {until}",
                   diagnose=lambda: f"missing: {self._gaps(until)}\n{self._context()}",
                   interval=0.25, fail=self.lost_meters)
        return time.monotonic() - t0

    def finish(self, slow: float = 150.0, timeout: float = 60) -> int:
        """End the run cleanly: from the next interval boundary b on, run the
        clock at `slow` (so the collector looks at every meter again after
        the interval ending at b has settled), and stop it just before b +
        period, where the meters would close the next one. Then wait until
        every read issued has finished. Returns b: the meters closed exactly
        the intervals before it."""
        pol = self.cfg.policy
        # a meter looked at just before b + settle is looked at again within
        # `every` plus one timer tick (1 real second = `slow` simulated ones)
        assert pol.settle + pol.every + slow < PERIOD - 1, "policy too slow for finish()"
        now = self.clock()
        b = (int(now) // PERIOD + 1) * PERIOD
        if b - now < 2 * self.clock.speed:       # too close to reach in time: the next one
            b += PERIOD
        wait_until(lambda: self.clock() >= b - self.clock.speed, 30, "the last boundary",
                   interval=0.02)
        self.clock.set(slow)
        stop_at = b + PERIOD - 1
        wait_until(lambda: self.clock() >= stop_at - slow, PERIOD / slow + 30,
                   "the end of the last interval", interval=0.05)
        self.clock.stop(at=stop_at)
        wait_until(lambda: self.clock() >= stop_at, 5, "the clock to stop")
        wait_until(lambda: not self.missing(b) and self.pending() == 0, timeout,
                   "the last reads to finish",
                   diagnose=lambda: f"missing: {self._gaps(b)}; pending {self.pending()}\n"
                                    f"{self._context()}", fail=self.lost_meters)
        return b

    def _gaps(self, until: int) -> str:
        miss = self.missing(until)
        total = sum(miss.values())
        return f"{total} intervals of {len(miss)} meters: " + ", ".join(
            f"m{m}:{n}" for m, n in sorted(miss.items())[:20])

    def _context(self) -> str:
        lines = [f"clock {self.clock():.0f}, online {self.online()}, "
                 f"reads {self.collect_reads()}, totals {dict(self.totals())}"]
        for d, p in self.daps.items():
            lines.append(f"dap {d}: alive {p.running()} queue {p.queue_state()} "
                         f"state {self.observer.state(d).get('counters') if self.observer else ''}")
        return "\n".join(lines)

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        for step in (self._close_fleet, self._close_headend, self._close_daps,
                     self._close_observer, self._close_broker):
            try:
                step()
            except Exception:  # keep tearing down: nothing may be left running
                pass

    def _close_fleet(self) -> None:
        if self.fleet is not None:
            self.fleet.stop(goodbye=False)
            self.fleet = None

    def _close_headend(self) -> None:
        if self.he is not None:
            self.he.stop()
            self.retired.append(self.he)
            self.he = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _close_daps(self) -> None:
        for p in self.daps.values():
            p.stop()

    def _close_observer(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None

    def _close_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()


# -- the verdict --------------------------------------------------------------------------


@dataclass
class Verdict:
    meters: int
    expected: int          # (meter, interval) pairs the meters closed in the run
    stored: int            # of those, held with both quantities, right values
    lost: int              # expected rows (either quantity) not stored
    duplicated: int        # rows stored more than once for one key
    conflicting: int       # rows stored with another value or quality
    extra: int             # rows stored for intervals nobody expected
    profile_mismatch: int  # meter profile rows that disagree with the metrology
    unchecked: int = 0     # intervals a meter closed at or after `until` (none may)
    examples: list[str] = field(default_factory=list)

    @property
    def exactly_once(self) -> bool:
        return not (self.lost or self.duplicated or self.conflicting or self.extra
                    or self.profile_mismatch or self.unchecked)


def verify(rig: Rig, until: int) -> Verdict:
    """Every interval each meter closed in [its collection start, until):
    both quantities stored exactly once with the value the meter measured,
    checked against SimulatedLoad (ground truth) and the meter's profile."""
    assert rig.store is not None and rig.fleet is not None
    stored: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for m, q, start, value, quality in rig.store.db.execute(
            "SELECT meter, quantity, start, value, quality FROM readings "
            "WHERE quantity IN (?, ?)", (IMPORT, EXPORT)):
        stored.setdefault((m, q, start), []).append((value, quality))
    v = Verdict(meters=len(rig.since), expected=0, stored=0, lost=0, duplicated=0,
                conflicting=0, extra=0, profile_mismatch=0)
    wanted: set[tuple[int, int, int]] = set()
    for m, since in sorted(rig.since.items()):
        sim = rig.fleet.meters[m]
        load = SimulatedLoad(m, PERIOD)
        prof = sim.core.profile
        assert since <= rig.t_load, f"meter {m}: collection starts after the run began"
        # every interval the meter closed is in the window checked below
        v.unchecked += max(0, prof.last + 1 - until // PERIOD)
        for k in range(since // PERIOD, until // PERIOD):
            v.expected += 1
            imp, exp = load.interval(k)
            if k - 1 > prof.first and k <= prof.last:
                a, b = prof.row(k - 1), prof.row(k)
                if ((b[0] - a[0]) & 0xFFFFFFFF, (b[1] - a[1]) & 0xFFFFFFFF) != (imp, exp):
                    v.profile_mismatch += 1
            else:
                v.profile_mismatch += 1
            ok = 0
            for q, want in ((IMPORT, imp), (EXPORT, exp)):
                key = (m, q, k * PERIOD)
                wanted.add(key)
                got = stored.get(key)
                if not got:
                    v.lost += 1
                    if len(v.examples) < 10:
                        v.examples.append(f"lost m{m} q{q} k{k}")
                    continue
                if len(got) > 1:
                    v.duplicated += len(got) - 1
                if any(g != (want, 0) for g in got):
                    v.conflicting += 1
                    if len(v.examples) < 10:
                        v.examples.append(f"conflict m{m} q{q} k{k}: {got} != {want}")
                    continue
                ok += 1
            v.stored += ok == 2
    for key, got in stored.items():
        if key not in wanted and key[0] in rig.since:
            v.extra += len(got)
            if len(v.examples) < 10:
                v.examples.append(f"extra {key}")
    return v


@dataclass
class Report:
    """One row of the per-fault table."""

    case: str
    broker: str
    meters: int = 0
    expected: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    reads: dict[str, int] = field(default_factory=dict)
    dropped: int | str = "n/a"
    success_after: float = 0.0
    success_end: float = 0.0
    converge_s: float = 0.0
    case_s: float = 0.0
    outcome: str = "passed"
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        reads = ",".join(f"{k}={v}" for k, v in sorted(self.reads.items()))
        if self.outcome != "passed":
            return (f"{self.case:<16} {self.broker:<9} {self.outcome} "
                    f"(case {self.case_s:.1f} s)")
        return (f"{self.case:<16} {self.broker:<9} {self.meters:>6} {self.expected:>8} "
                f"{self.stored:>8} {self.lost:>5} {self.duplicated:>5} "
                f"{self.success_after:>7.2%} {self.success_end:>7.2%} {str(self.dropped):>7} "
                f"{self.converge_s:>7.1f} {self.case_s:>6.1f}  {reads}")

    HEADER = (f"{'fault':<16} {'broker':<9} {'meters':>6} {'expected':>8} {'stored':>8} "
              f"{'lost':>5} {'dup':>5} {'succ@f':>7} {'succ@end':>7} {'dropped':>7} "
              f"{'conv s':>7} {'case s':>6}  re-reads by reason")


def rate(held_expected: tuple[int, int]) -> float:
    held, expected = held_expected
    return held / expected if expected else 1.0


# -- the faults -----------------------------------------------------------------------------


def kill_dap_mid_buffer(rig: Rig, dap: int, down: float) -> dict[str, Any]:
    """kill -9 the DAP while its aggregation buffer is partly filled (its
    disk queue holds envelopes acknowledged to the broker and not yet in a
    bundle), keep it down `down` real seconds, start it again."""
    p = rig.daps[dap]
    limit = rig.cfg.dap_max_items
    least = min(20, len(rig.cfg.daps[dap]) // 2)
    held: dict[str, int] | None = None
    assert rig.observer is not None and p.proc is not None

    def start() -> None:
        t = time.monotonic()
        p.start()
        wait_until(lambda: p.running() and any(s.get("state") == "online"
                                             for _, s in rig.observer.history(dap, t)),
                   30, f"DAP {dap} back online", diagnose=p.log)

    def caught() -> bool:
        """Freeze the DAP (SIGSTOP) and look: with a partly filled buffer it
        is killed where it stands, otherwise it runs on. (Looking and then
        killing a running DAP races its next flush.) A frozen DAP may have
        written a commit to its WAL and not yet indexed it, which the look
        misses; what the kill left is read after it (the first reader of a
        crashed WAL database recovers every commit). In the rare case that
        commit was a flush, which empties the buffer, the DAP is started
        again and caught anew."""
        nonlocal held
        p.proc.send_signal(signal.SIGSTOP)
        q = p.queue_state()
        if q is None or not least <= q["unbundled"] < limit:
            p.proc.send_signal(signal.SIGCONT)
            return False
        p.kill()
        held = p.queue_state()  # committed: everything the DAP acknowledged and still owns
        if held is not None and held["unbundled"] > 0:
            return True
        start()
        return False

    wait_until(caught, 120, f"DAP {dap} to hold a partly filled buffer", interval=0.01)
    assert held is not None
    time.sleep(down)
    start()
    return {"held_at_kill": held, "recovered": p.recovery_lines()[-1]}


def restart_broker(rig: Rig, down: float) -> None:
    """Stop the broker (SIGTERM: Mosquitto saves its persistence file;
    amqtt keeps nothing), keep it down, start it on the same port."""
    assert rig.broker is not None
    rig.broker.stop()
    time.sleep(down)
    rig.broker.restart()


class Requester:
    """A second head-end process that only sends requests (HeadEnd with
    ingest=False, as `python -m headend read` runs it): group reads of the
    current registers through the DAPs, so that they have responses to hold
    while the ingesting head-end is down."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.he = HeadEnd(rig.hcfg.db, rig.hcfg.secret_key, rig.settings, ingest=False,
                          client_id=f"{topics.HEADEND}-req", retries=0, clock=rig.clock,
                          budget=rig.cfg.budget).start()
        self.handles: list = []
        self.next = 0.0

    def tick(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + 1.0
        for dap in self.rig.cfg.daps:
            self.handles.append(self.he.read_group(dap, ReadSpec("current"), "fanout"))

    def requests(self) -> list[tuple[int, int]]:
        return [(h.request, m) for h in self.handles for m in h.meters]

    def stop(self) -> None:
        self.he.stop()


def replay_bundle(rig: Rig, dap: int, payload: bytes) -> None:
    """Publish a bundle again on d<dap>/up, with the DAP's own account (as
    a broker or DAP redelivery would), from a connection of our own."""
    assert rig.broker is not None
    password = (rig.site / "daps" / topics.dap_name(dap) / "password").read_text().strip()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{topics.dap_name(dap)}-replay",
                    protocol=mqtt.MQTTv311, clean_session=True)
    c.username_pw_set(topics.dap_name(dap), password)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(rig.broker.host, rig.broker.port, 30)
    c.loop_start()
    try:
        assert connected.wait(15), "the replaying client could not connect"
        c.publish(topics.dap_up(dap), payload, qos=1).wait_for_publish(15)
    finally:
        c.disconnect()
        c.loop_stop()


def processes_of(workdir: Path) -> list[str]:
    """Command lines of live processes started for this workdir (brokers,
    DAPs): what must be gone after close()."""
    out = []
    needle = str(workdir)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and ("mosquitto" in cmd or "headend.broker" in cmd
                              or "-m dap" in cmd):
            out.append(f"{d.name} {cmd.strip()}")
    return out
