"""A malicious DAP in the real message path (docs/protocol.md §8,
docs/security.md).

The world, per broker: a site provisioned at run time (keys and accounts
generated now), a real broker with the site's accounts and ACLs, the real
head-end (HeadEnd, in-process), real meters (sim.fleet.Fleet: the firmware's
meter core behind paho-mqtt) behind DAP 1, plus one flow-A meter; and, in
place of the DAP process, tests.adversary.MaliciousDap logged in with DAP 1's
own account. It relays like the real DAP in router mode except where a test
installs an attack.

For every attack the test checks, against the real components:

- nothing forged, altered or replayed is stored: every reading row equals
  what the meter's own simulated metrology says (`World.check_rows`), and
  an attacked read stores exactly the rows an honest read of that range
  stores (`World.expected_rows`, the same function the honest baseline is
  held to);
- nothing forged is acted on by a meter: no response, `core.stats` shows no
  new request, the DAP sees no uplink from it beyond the genuine ones;
- each rejection is counted once under its reason, at the head-end
  (`ingest.totals` and the persisted `Store.counts()`) or at the meter
  (`core.stats`), compared as exact dictionaries.

Ordering, never timing, makes the counts exact: after an attack the test
sends a genuine message on the same topic from the same publisher (a read
through the DAP), and MQTT delivers a publisher's QoS 1 messages on one topic
in order, so when the genuine one has been handled, so has the attack.

Run with SECURITY_REPORT=path.json to write what each attack achieved and
what it was counted as (the numbers in docs/security.md come from that).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from firmware.profile import DAYS_KEPT
from headend import provision
from headend.collect import CollectPolicy
from headend.config import HeadEndConfig
from headend.requests import ReadSpec
from headend.service import HeadEnd, ReadHandle
from headend.store import Store
from shared import messages, obis, topics
from shared.backend import DEFAULT
from shared.channel import Channel
from shared.const import (
    DOWN,
    ENV_HEADER,
    K_GROUP,
    MAC_BYTES,
    MAX_ROWS,
    MAX_U32,
    REPLAY_WINDOW,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    UP,
    VERSION,
)
from shared.hostmqtt import BrokerSettings
from sim.fleet import Fleet
from sim.scenarios import plaintext_patterns, scan
from tests.adversary import (
    Forger,
    Holder,
    MaliciousDap,
    decode_group,
    flip,
    group_item,
    hint_of,
    random_box,
    with_hint,
)
from tests.brokers import start_broker
from tests.waits import wait_until

B = DEFAULT
DAP = 1
GROUP = 7
METERS = (1001, 1002, 1003, 1004)  # behind DAP 1, all in group 7
DIRECT = 5001                      # flow A: not behind any DAP
BUDGET = {"A": 8, "B": 8}          # seconds a meter has; a re-send comes 1 s later
CUR = ReadSpec("current")
WAIT = 45.0                        # generous deadline for any one event
P = 900

OBSERVED: list[dict[str, Any]] = []


# -- the world ---------------------------------------------------------------------


def _copy(d: dict) -> dict:
    """A copy of a dict another thread may be adding keys to."""
    for _ in range(100):
        try:
            return dict(d)
        except RuntimeError:
            time.sleep(0.001)
    return dict(d)


@dataclass
class Snap:
    he: dict[str, int]
    db: dict[str, int]
    meters: dict[int, dict[str, int]]
    rows: int
    at: float


@dataclass
class Delta:
    he: dict[str, int]       # head-end ingest.totals, rejected:<reason> -> n (reason only)
    db: dict[str, int]       # the same from the store's persisted counts
    meters: dict[int, dict[str, int]]  # meter -> changed core.stats keys
    rows: int                # new reading rows
    stored: int              # head-end "stored" total

    def meter(self, m: int) -> dict[str, int]:
        return self.meters.get(m, {})


def _rejected(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k.split(":", 1)[1]: v - before.get(k, 0) for k, v in now.items()
            if k.startswith("rejected:") and v != before.get(k, 0)}


class World:
    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp = kind, tmp
        self.he: HeadEnd | None = None
        self.dap: MaliciousDap | None = None
        self.fleet: Fleet | None = None
        self.broker = None
        self.responses: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        # interval ranges handed out by fresh(): from 3 days ago backwards,
        # so the last 3 days stay unread for the collection test
        self._cursor = (int(time.time()) // P * P) - 3 * 86400
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        site = self.site = self.tmp / "site"
        provision.init(site, port=1883)  # the broker's port is set below
        provision.add_dap(site, DAP, "router", operator="fieldnet-contractor")
        provision.add_meters(site, list(METERS), dap=DAP, group=GROUP)
        provision.add_meters(site, [DIRECT])
        self.cfg = HeadEndConfig.load(site)
        self.broker = start_broker(self.kind, self.tmp / "broker",
                                   layout=provision.layout(site),
                                   accounts=provision.accounts(site), anonymous=False)
        host, port = self.broker.host, self.broker.port
        self.settings = BrokerSettings(host=host, port=port, username=topics.HEADEND,
                                       password=self.cfg.broker.password)
        self.store = Store(self.cfg.db)
        self.start_headend()
        # DAP 1's own account, as the real DAP would log in
        password = (site / "daps" / topics.dap_name(DAP) / "password").read_text().strip()
        self.dap = MaliciousDap(host, port, DAP, password).start()
        self.fleet = Fleet(host=host, port=port, on_response=self._on_response)
        for m in (*METERS, DIRECT):
            self.fleet.add((site / "meters" / topics.meter_name(m) / "meter.json").read_text())
        self.fleet.start()
        wait_until(lambda: all(self.store.online().get(m) for m in (*METERS, DIRECT)), WAIT,
                   "every meter's birth to reach the head-end")

    def _on_response(self, m, wire: bytes) -> None:
        with self._lock:
            self.responses.append((m.id, wire))

    def start_headend(self, **kw: Any) -> HeadEnd:
        kw.setdefault("retries", 2)
        kw.setdefault("budget", BUDGET)
        self.he = HeadEnd(self.cfg.db, self.cfg.secret_key, self.settings, **kw).start()
        return self.he

    def stop_headend(self) -> None:
        if self.he is not None:
            self.he.stop()
            self.he = None

    def close(self) -> None:
        for step in (lambda: self.fleet and self.fleet.stop(goodbye=False),
                     self.stop_headend,
                     lambda: self.dap and self.dap.close(),
                     lambda: self.broker and self.broker.stop(),
                     lambda: getattr(self, "store", None) and self.store.close()):
            try:
                step()
            except Exception:
                pass

    # -- reads ---------------------------------------------------------------------

    def fresh(self, hours: int = 1) -> ReadSpec:
        """An interval range no test has read yet (so a forged row would
        have nowhere to hide behind a stored one)."""
        with self._lock:
            end = self._cursor
            self._cursor -= hours * 3600
        assert end - hours * 3600 > time.time() - (DAYS_KEPT - 0.5) * 86400, "out of fresh ranges"
        return ReadSpec("interval", end - hours * 3600, end)

    def read(self, meter: int, spec: ReadSpec, timeout: float = WAIT) -> ReadHandle:
        assert self.he is not None
        h = self.he.read(meter, spec)
        got = h.wait(timeout)
        assert got == {meter: "answered"}, f"read of meter {meter}: {got}"
        return h

    def attempts(self, h: ReadHandle, meter: int) -> int:
        return self.store.db.execute("SELECT attempts FROM requests WHERE request = ? AND "
                                     "meter = ?", (h.request, meter)).fetchone()[0]

    def status(self, h: ReadHandle, meter: int) -> str | None:
        return self.store.request_status(h.request, meter)

    # -- counts ----------------------------------------------------------------------

    def snap(self) -> Snap:
        assert self.he is not None and self.fleet is not None
        return Snap(_copy(self.he.ingest.totals), self.store.counts(),
                    {m: _copy(sm.core.stats) for m, sm in self.fleet.meters.items()},
                    self.store.reading_count(), time.time())

    def delta(self, s0: Snap) -> Delta:
        assert self.he is not None and self.fleet is not None
        he = _copy(self.he.ingest.totals)
        meters = {}
        for m, sm in self.fleet.meters.items():
            now = _copy(sm.core.stats)
            d = {k: v - s0.meters[m].get(k, 0) for k, v in now.items()
                 if v != s0.meters[m].get(k, 0)}
            if d:
                meters[m] = d
        return Delta(_rejected(he, s0.he), _rejected(self.store.counts(), s0.db), meters,
                     self.store.reading_count() - s0.rows,
                     he.get("stored", 0) - s0.he.get("stored", 0))

    def public_key(self, meter: int) -> bytes:
        row = self.store.meter(meter)
        assert row is not None
        return row.public_key

    def inner(self, meter: int, env: bytes, direction: int = UP) -> tuple[int, int, list]:
        """The referee's view: (type, counter, body) of a genuine envelope,
        opened with the keys provisioning made for this run. The adversary
        cannot do this; the test uses it only to pick and to explain."""
        key = B.beforenm(self.public_key(meter), self.cfg.secret_key)
        ch = Channel(B, key, meter, UP if direction == DOWN else DOWN, None)
        return ch.unseal(env)

    # -- the truth ---------------------------------------------------------------------

    def truth(self, meter: int, q: int, t: int) -> int:
        """What meter measured: interval energies, power and voltage from its
        simulated metrology (a pure function of the meter's seed), registers
        from the load profile the meter accumulated from it."""
        assert self.fleet is not None
        sm = self.fleet.meters[meter]
        src, prof, p = sm.source, sm.core.profile, sm.cfg["period"]
        k = t // p
        if q == obis.INTERVAL_IMPORT:
            return src.interval(k)[0]
        if q == obis.INTERVAL_EXPORT:
            return src.interval(k)[1]
        if q == obis.POWER:
            return src.power(t)
        if q == obis.VOLTAGE:
            return src.voltage(t)
        imp, exp, _ = prof.row(k - 1)
        # the profile itself is the metrology's sum: check the step into k - 1
        pi, pe, _ = prof.row(k - 2)
        assert ((imp - pi) & 0xFFFFFFFF, (exp - pe) & 0xFFFFFFFF) == src.interval(k - 1)
        di, de = src.peek(k, t - k * p)
        return ((imp + di) if q == obis.ENERGY_IMPORT else (exp + de)) & 0xFFFFFFFF

    def expected_rows(self, meter: int, spec: ReadSpec) -> set[tuple[int, int, int, int]]:
        """The rows an honest interval read of `spec` stores: per response
        part the two registers at its start, per interval its two energies
        (quality 0: the simulated meters have no outages)."""
        assert spec.start is not None and spec.end is not None
        k0, k1 = -(-spec.start // P), -(-spec.end // P)
        rows = set()
        for a in range(k0, k1, MAX_ROWS):
            for q in (obis.ENERGY_IMPORT, obis.ENERGY_EXPORT):
                rows.add((q, a * P, self.truth(meter, q, a * P), 0))
            for k in range(a, min(k1, a + MAX_ROWS)):
                for q in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT):
                    rows.add((q, k * P, self.truth(meter, q, k * P), 0))
        return rows

    def rows(self, meter: int, spec: ReadSpec) -> set[tuple[int, int, int, int]]:
        assert spec.start is not None and spec.end is not None
        return {(q, t, v, f) for q, t, v, f, _ in self.store.readings(meter, None, spec.start,
                                                                        spec.end)}

    def check_rows(self) -> int:
        """Every row of the readings table equals the metrology. Returns how
        many rows were checked."""
        n = 0
        for meter, q, t, v, f in self.store.db.execute(
                "SELECT meter, quantity, start, value, quality FROM readings"):
            assert f == 0, (meter, q, t, f)
            assert v == self.truth(meter, q, t), f"meter {meter} q {q} at {t}: stored {v}"
            n += 1
        return n

    def record(self, attack: str, test: str, d: Delta, achieved: str, stopped_by: str,
               **extra: Any) -> None:
        assert d.he == d.db, "ingest.totals and the persisted counts disagree"
        meters = {m: {k.split(":", 1)[1]: v for k, v in s.items() if k.startswith("rejected:")}
                  for m, s in d.meters.items()}
        OBSERVED.append({"attack": attack, "test": test, "broker": self.kind,
                         "achieved": achieved, "stopped_by": stopped_by,
                         "headend_rejected": d.he, "meter_rejected":
                         {m: r for m, r in meters.items() if r}, "new_rows": d.rows, **extra})


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def world(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[World]:
    w = World(request.param, tmp_path_factory.mktemp(f"adversary-{request.param}"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    out = os.environ.get("SECURITY_REPORT")
    if out:
        Path(out).write_text(json.dumps(OBSERVED, indent=1) + "\n")


@pytest.fixture(autouse=True)
def honest_dap(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts and ends with an honest relay and an unchanged
    readings table (only true rows)."""
    w = request.getfixturevalue("world")
    w.dap.honest()
    try:
        yield
    finally:
        w.dap.honest()
    assert not w.dap.errors, w.dap.errors
    w.check_rows()


# the attacks that are not part of the core run only on Mosquitto
mosquitto_only = pytest.mark.parametrize("world", ["mosquitto"], indirect=True, scope="module")


def once(fn):
    """A hook that attacks the first message it is given for which fn
    returns something, and is honest afterwards."""
    done = threading.Event()

    def hook(*args):
        if done.is_set():
            return None
        out = fn(*args)
        if out is not None:
            done.set()
        return out

    hook.done = done  # type: ignore[attr-defined]
    return hook


def forwards_for(meter: int):
    """match(None, payload) for a forward message carrying a request for meter."""

    def match(_m, payload: bytes) -> bool:
        try:
            obj = cbor2.loads(payload)
            return obj[1] == 1 and any(hint_of(e) == meter for e in obj[3])
        except Exception:
            return False

    return match


def is_group(_m, payload: bytes) -> bool:
    try:
        return cbor2.loads(payload)[1] == K_GROUP
    except Exception:
        return False


# -- the honest baseline ----------------------------------------------------------------


def test_honest_relay_stores_exactly_the_metrology(world: World) -> None:
    """The reference every attack is compared with: through an honest relay,
    every read is answered and stores exactly expected_rows(), nothing is
    rejected anywhere."""
    w = world
    s0 = w.snap()
    specs = {m: w.fresh() for m in METERS}
    handles = [w.he.read(m, specs[m]) for m in METERS] + [w.he.read(m, CUR) for m in METERS]
    handles.append(w.he.read(DIRECT, CUR))
    for h in handles:
        assert set(h.wait(WAIT).values()) == {"answered"}
    d = w.delta(s0)
    assert d.he == {} and d.db == {}
    assert all(not k.startswith("rejected") for s in d.meters.values() for k in s)
    for m in METERS:
        assert w.rows(m, specs[m]) == w.expected_rows(m, specs[m])
    assert w.check_rows() >= d.rows > 0
    w.record("none (honest relay)", "test_honest_relay_stores_exactly_the_metrology", d,
             "nothing", "-", reads=len(handles))


# -- tampering -------------------------------------------------------------------------


def test_tampered_response_is_rejected_and_the_genuine_one_stored(world: World) -> None:
    """Bit flips in the nonce, the tag, the ciphertext and the meter-id hint,
    a truncation, a changed kind and version byte: each is a separate
    envelope in the bundle before the genuine one."""
    w = world
    x = 1001
    spec = w.fresh()

    def attack(meter: int, env: bytes):
        if meter != x:
            return None
        forged = [
            flip(env, 10),                 # nonce
            flip(env, 30),                 # Poly1305 tag
            flip(env, len(env) - 1),       # ciphertext
            flip(env, 4, 0x02),            # hint 1001 -> 1003: a registered meter
            flip(env, 4, 0x01),            # hint 1001 -> 1000: nobody
            env[:-1],                      # truncated by one byte
            flip(env, 0, 0x03),            # kind 0x11 -> 0x12 (a group item)
            flip(env, 0, 0x30),            # version 1 -> 2
        ]
        return [forged, [env[:40]], [env]]  # shorter than a header: the bundle is refused

    w.dap.uplink_hook = once(attack)
    s0 = w.snap()
    w.read(x, spec)
    d = w.delta(s0)
    assert d.he == {"auth": 5, "unknown-meter": 1, "malformed": 2, "version": 1}
    assert d.db == d.he
    assert w.rows(x, spec) == w.expected_rows(x, spec)
    assert d.rows == len(w.expected_rows(x, spec))
    w.record("flip bits in a response (nonce, tag, ciphertext, hint), truncate, change "
             "kind/version", "test_tampered_response_is_rejected_and_the_genuine_one_stored",
             d, "nothing: the genuine copy, relayed after, was stored",
             "Poly1305 tag under the pairwise key; hint picks the key (unknown hint: no key); "
             "framing checks")


def test_tampered_request_is_rejected_by_the_meter(world: World) -> None:
    """The same flips on a request on its way to the meter: the meter
    refuses each and answers only the genuine copy."""
    w = world
    x, y = 1002, 1003  # 1002 ^ 1 = 1003
    spec = w.fresh()
    down = topics.meter_down

    def attack(payload: bytes):
        if not forwards_for(x)(None, payload):
            return None
        env = [e for e in cbor2.loads(payload)[3] if hint_of(e) == x][0]
        return [
            (down(x, DAP), flip(env, 10)),            # nonce
            (down(x, DAP), flip(env, 30)),            # tag
            (down(x, DAP), flip(env, len(env) - 1)),  # ciphertext
            (down(x, DAP), env[:-1]),                 # truncated
            (down(x, DAP), env[:40]),                 # shorter than a header
            (down(x, DAP), flip(env, 4, 0x01)),       # hint says 1003, on 1002's topic
            (down(y, DAP), flip(env, 4, 0x01)),       # ... and delivered to 1003
            (down(x, DAP), flip(env, 0, 0x30)),       # version 2
            (down(x, DAP), env),                      # the genuine request
        ]

    w.dap.request_hook = once(attack)
    s0 = w.snap()
    w.read(x, spec)
    w.read(y, w.fresh())  # orders 1003's downlink after the forged copy
    d = w.delta(s0)
    assert d.meter(x) == {"rejected": 7, "rejected:auth": 4, "rejected:malformed": 1,
                          "rejected:mismatch": 1, "rejected:version": 1,
                          "requests": 1, "responses": 1}
    assert d.meter(y) == {"rejected": 1, "rejected:auth": 1, "requests": 1, "responses": 1}
    assert d.he == {}
    assert w.rows(x, spec) == w.expected_rows(x, spec)
    w.record("flip bits in a request (nonce, tag, ciphertext, hint), truncate, version",
             "test_tampered_request_is_rejected_by_the_meter", d,
             "nothing: the meter answered only the genuine copy",
             "Poly1305 tag; the meter checks the hint is its own id")


# -- replay, reflection, swapping ---------------------------------------------------------


def test_replayed_responses_are_rejected_duplicate(world: World) -> None:
    w = world
    x = 1003
    t0 = time.time()
    w.read(x, w.fresh())
    env = w.dap.uplinks_of(x, t0)[-1]
    old_seq = w.dap.bundles[-1][1]
    s0 = w.snap()
    w.dap.send_bundle([env, env])        # twice in one bundle
    w.dap.send_bundle([env], seq=old_seq)  # the whole old bundle again, same seq
    barrier = w.fresh()
    w.read(x, barrier)
    d = w.delta(s0)
    assert d.he == {"duplicate": 3}
    assert d.rows == len(w.expected_rows(x, barrier))  # the replays stored nothing
    w.record("replay old responses upstream (in a new bundle, or the old bundle again)",
             "test_replayed_responses_are_rejected_duplicate", d, "nothing",
             "head-end replay window (counter inside the box), persisted with the readings")


def test_replayed_request_gets_no_answer(world: World) -> None:
    w = world
    x = 1004
    t0 = time.time()
    w.read(x, w.fresh())
    req = w.dap.forwarded_to(x, t0)[-1]
    s0 = w.snap()
    w.dap.deliver(x, req)
    w.dap.deliver(x, req)
    w.read(x, w.fresh())
    d = w.delta(s0)
    assert d.meter(x) == {"rejected": 2, "rejected:duplicate": 2, "requests": 1, "responses": 1}
    assert len(w.dap.uplinks_of(x, s0.at)) == 1  # only the genuine read's answer
    w.record("replay an old request downstream", "test_replayed_request_gets_no_answer", d,
             "nothing: no answer", "meter replay window; highest counter kept on flash")


def test_reflections_are_rejected_direction(world: World) -> None:
    """A request reflected to the head-end as if it were a response, and a
    response reflected to its meter as if it were a request: both open
    (one pairwise key for both directions), both fail the sealed direction."""
    w = world
    x = 1001

    def reflect(payload: bytes):
        if not forwards_for(x)(None, payload):
            return None
        req = [e for e in cbor2.loads(payload)[3] if hint_of(e) == x][0]
        w.dap.send_bundle([req], wait=False)    # up, as a "response"
        return w.dap.fan_out(payload)          # and delivered as usual

    w.dap.request_hook = once(reflect)
    s0 = w.snap()
    w.read(x, w.fresh())
    resp = w.dap.uplinks_of(x, s0.at)[-1]
    w.dap.deliver(x, resp)                     # down, as a "request"
    w.read(x, w.fresh())
    d = w.delta(s0)
    assert d.he == {"direction": 1}
    assert d.meter(x) == {"rejected": 1, "rejected:direction": 1, "requests": 2, "responses": 2}
    w.record("reflect a request back as a response / a response back as a request",
             "test_reflections_are_rejected_direction", d, "nothing",
             "direction field inside the box")


def test_swapped_meter_ids_are_rejected_auth(world: World) -> None:
    w = world
    x, y = 1001, 1002
    held: dict[int, bytes] = {}
    both = threading.Event()

    def hold(meter: int, env: bytes):
        if meter in (x, y) and meter not in held:
            held[meter] = env
            if len(held) == 2:
                both.set()
            return []
        return None

    w.dap.uplink_hook = hold
    sx, sy = w.fresh(), w.fresh()
    s0 = w.snap()
    hx, hy = w.he.read(x, sx), w.he.read(y, sy)
    assert both.wait(WAIT)
    ex, ey = held[x], held[y]
    w.dap.send_bundle([with_hint(ex, y), with_hint(ey, x)])
    w.dap.send_bundle([ex, ey])
    assert hx.wait(WAIT) == {x: "answered"} and hy.wait(WAIT) == {y: "answered"}
    d = w.delta(s0)
    assert d.he == {"auth": 2}
    assert w.rows(x, sx) == w.expected_rows(x, sx) and w.rows(y, sy) == w.expected_rows(y, sy)
    w.record("swap the outer meter ids of two responses",
             "test_swapped_meter_ids_are_rejected_auth", d,
             "nothing: the genuine pair, relayed after, was stored",
             "the hint picks the key; the box opens only under the right pairwise key")


# -- forged requests ------------------------------------------------------------------------


def test_forged_requests_get_no_answer(world: World) -> None:
    """Random boxes; a well-formed request sealed under a key the adversary
    made up; another meter's (undelivered) request re-addressed."""
    w = world
    x, y = 1003, 1004
    forger = Forger()
    hold_y = Holder(forwards_for(y))
    w.dap.request_hook = hold_y.request
    s0 = w.snap()
    hy = w.he.read(y, w.fresh())
    assert hold_y.full.wait(WAIT)
    req_y = [e for e in cbor2.loads(hold_y.held[0][1])[3] if hint_of(e) == y][0]
    w.dap.deliver(x, random_box(x))
    w.dap.deliver(x, random_box(x, 200))
    w.dap.deliver(x, forger.request(x, w.public_key(x)))
    w.dap.deliver(x, with_hint(req_y, x))       # re-addressed to x
    w.dap.deliver(x, req_y)                     # y's request on x's topic, unchanged
    w.dap.relay_request(hold_y.held[0][1])  # y still gets its own request
    assert hy.wait(WAIT) == {y: "answered"}
    w.read(x, w.fresh())
    d = w.delta(s0)
    assert d.meter(x) == {"rejected": 5, "rejected:auth": 4, "rejected:mismatch": 1,
                          "requests": 1, "responses": 1}
    assert d.meter(y) == {"requests": 1, "responses": 1}
    assert len(w.dap.uplinks_of(x, s0.at)) == 1
    w.record("inject forged requests: random boxes, boxes under a key it made up, another "
             "meter's request re-addressed", "test_forged_requests_get_no_answer", d,
             "nothing: no answer to any forgery",
             "Poly1305 tag under the head-end/meter pairwise key; hint = own id")


def test_forged_group_requests_are_rejected(world: World) -> None:
    """With a genuine group request in hand: an altered body, one member's
    entry moved to another meter (re-addressed, or on the other's topic),
    a made-up group with random boxes and with boxes under its own key.
    Then the genuine fan-out: every member answers it once."""
    w = world
    forger = Forger()
    hold = Holder(is_group)
    w.dap.request_hook = hold.request
    s0 = w.snap()
    h = w.he.read_group(GROUP, CUR, "fanout")
    assert hold.full.wait(WAIT)
    genuine = hold.held[0][1]
    _, gid, nonce, body, entries = decode_group(genuine)
    assert gid == GROUP and sorted(m for m, _ in entries) == list(METERS)
    box = {m: b for m, b in entries}
    altered = flip(body, len(body) - 1)         # tolerance 0 -> 1
    x, y = 1001, 1002
    for m in METERS:
        w.dap.deliver(m, group_item(m, nonce, box[m], altered))
    w.dap.deliver(y, group_item(y, nonce, box[x], body))   # x's entry, re-addressed to y
    w.dap.deliver(y, group_item(x, nonce, box[x], body))   # x's item on y's topic
    fake_nonce = os.urandom(24)
    fake_body, fake_entries = forger.group(99, fake_nonce, [(m, w.public_key(m)) for m in METERS])
    fake = {m: b for m, b in fake_entries}
    for m in METERS:
        w.dap.deliver(m, group_item(m, fake_nonce, os.urandom(32), fake_body))
        w.dap.deliver(m, group_item(m, fake_nonce, fake[m], fake_body))
    w.dap.relay_request(genuine)
    assert h.wait(WAIT) == {m: "answered" for m in METERS}
    d = w.delta(s0)
    for m in METERS:
        extra = {"auth": 1, "mismatch": 1} if m == y else {}
        auth, mismatch = 2 + extra.get("auth", 0), 1 + extra.get("mismatch", 0)
        assert d.meter(m) == {"rejected": auth + mismatch, "rejected:auth": auth,
                              "rejected:mismatch": mismatch, "requests": 1, "responses": 1}, m
    assert d.he == {}
    w.record("inject forged group requests: altered body, a member's entry moved to another "
             "meter, a made-up group (random boxes / boxes under its own key)",
             "test_forged_group_requests_are_rejected", d,
             "nothing: each member answered only the genuine group request",
             "per-member box of SHA-256(body) under each pairwise key")


def test_replayed_group_request_is_rejected(world: World) -> None:
    """The old group request re-sent: duplicate at every member; after the
    members have seen newer requests (the downlink counter moved on by more
    than the window), stale."""
    w = world
    t0 = time.time()
    h = w.he.read_group(GROUP, CUR, "fanout")
    assert h.wait(WAIT) == {m: "answered" for m in METERS}
    old = w.dap.group_requests(t0)[-1]
    s0 = w.snap()
    w.dap.relay_request(old)
    # Other head-end processes sending 2 windows' worth of requests, as far
    # as the meters can tell: the shared downlink counter jumps ahead.
    w.store.reserve("downlink", 2 * REPLAY_WINDOW)
    h2 = w.he.read_group(GROUP, CUR, "fanout")
    assert h2.wait(WAIT) == {m: "answered" for m in METERS}
    w.dap.relay_request(old)
    h3 = w.he.read_group(GROUP, CUR, "fanout")   # barrier
    assert h3.wait(WAIT) == {m: "answered" for m in METERS}
    d = w.delta(s0)
    for m in METERS:
        assert d.meter(m) == {"rejected": 2, "rejected:duplicate": 1, "rejected:stale": 1,
                              "requests": 2, "responses": 2}, m
    assert d.he == {}
    w.record("re-send an old group request (within, then beyond the window)",
             "test_replayed_group_request_is_rejected", d, "nothing: no answer",
             "group body carries a downlink counter; each member's window")


# -- reordering (Mosquitto only) ----------------------------------------------------------------


@mosquitto_only
def test_reordered_responses_within_the_window_are_accepted(world: World) -> None:
    w = world
    x = 1002
    hold = Holder(lambda m, e: m == x)
    w.dap.uplink_hook = hold.uplink
    specs = [w.fresh() for _ in range(5)]
    s0 = w.snap()
    handles = [w.he.read(x, s) for s in specs]
    for h in handles[1:]:
        assert h.wait(WAIT) == {x: "answered"}
    assert hold.full.is_set() and not handles[0]._done.is_set()
    w.dap.send_bundle([hold.held[0][1]])       # the first answer, last
    assert handles[0].wait(WAIT) == {x: "answered"}
    d = w.delta(s0)
    assert d.he == {}
    for s in specs:
        assert w.rows(x, s) == w.expected_rows(x, s)
    w.record("reorder responses within the 64-wide window",
             "test_reordered_responses_within_the_window_are_accepted", d,
             "nothing: all stored, in any order (reordering is allowed)", "-")


@mosquitto_only
def test_response_held_beyond_the_window_is_stale_and_reread(world: World) -> None:
    w = world
    x = 1003
    hold = Holder(lambda m, e: m == x)
    w.dap.uplink_hook = hold.uplink
    spec = w.fresh()
    s0 = w.snap()
    first = w.he.read(x, spec)
    assert hold.full.wait(WAIT)
    later = [w.he.read(x, CUR) for _ in range(REPLAY_WINDOW + 6)]
    for h in later:
        assert h.wait(WAIT) == {x: "answered"}
    w.dap.send_bundle([hold.held[0][1]])       # 70 answers late
    assert first.wait(WAIT) == {x: "answered"}  # by the head-end's re-send
    w.read(x, w.fresh())                         # barrier
    d = w.delta(s0)
    assert d.he == {"stale": 1}
    assert w.attempts(first, x) == 2
    assert w.rows(x, spec) == w.expected_rows(x, spec)
    w.record("hold a response back beyond the 64-wide window, then release it",
             "test_response_held_beyond_the_window_is_stale_and_reread", d,
             "a delay: the read was answered by the head-end's re-send "
             f"(budget {BUDGET['B']} s + 1 s later)",
             "head-end replay window (too old to check: refused)", newer_messages=len(later))


@mosquitto_only
def test_reordered_requests_within_and_beyond_the_window(world: World) -> None:
    w = world
    x = 1004
    # within the window: the older request arrives second and is answered
    hold = Holder(forwards_for(x))
    w.dap.request_hook = hold.request
    sa, sb = w.fresh(), w.fresh()
    s0 = w.snap()
    ha = w.he.read(x, sa)
    assert hold.full.wait(WAIT)
    w.dap.request_hook = None
    w.read(x, sb)
    w.dap.relay_request(hold.held[0][1])
    assert ha.wait(WAIT) == {x: "answered"} and w.attempts(ha, x) == 1
    d1 = w.delta(s0)
    assert d1.meter(x) == {"requests": 2, "responses": 2}
    # beyond: the head-end's downlink counter moves on by more than the window
    hold = Holder(forwards_for(x))
    w.dap.request_hook = hold.request
    s1 = w.snap()
    sc = w.fresh()
    hc = w.he.read(x, sc)
    assert hold.full.wait(WAIT)
    w.dap.request_hook = None
    w.store.reserve("downlink", 2 * REPLAY_WINDOW)
    w.read(x, w.fresh())
    w.dap.relay_request(hold.held[0][1])
    assert hc.wait(WAIT) == {x: "answered"}    # by the re-send
    w.read(x, w.fresh())                         # barrier
    d2 = w.delta(s1)
    assert d2.meter(x) == {"rejected": 1, "rejected:stale": 1, "requests": 3, "responses": 3}
    assert w.attempts(hc, x) == 2
    assert w.rows(x, sc) == w.expected_rows(x, sc)
    w.record("reorder requests within the window", "test_reordered_requests_within_and_beyond"
             "_the_window", d1, "nothing: both answered", "-")
    w.record("hold a request back beyond the window, then deliver it",
             "test_reordered_requests_within_and_beyond_the_window", d2,
             "a delay: answered through the head-end's re-send",
             "meter replay window (refused as stale)")


# -- drops and delays (Mosquitto only) -------------------------------------------------------------


@mosquitto_only
def test_dropped_request_and_response_are_resent(world: World) -> None:
    w = world
    x, y = 1001, 1002
    drop_req = Holder(forwards_for(x))
    drop_resp = Holder(lambda m, e: m == y)
    w.dap.request_hook = drop_req.request
    w.dap.uplink_hook = drop_resp.uplink
    sx, sy = w.fresh(), w.fresh()
    s0 = w.snap()
    hx, hy = w.he.read(x, sx), w.he.read(y, sy)
    assert hx.wait(WAIT) == {x: "answered"} and hy.wait(WAIT) == {y: "answered"}
    assert drop_req.full.is_set() and drop_resp.full.is_set()
    d = w.delta(s0)
    assert d.he == {}
    assert w.attempts(hx, x) == 2 and w.attempts(hy, y) == 2
    assert d.meter(x) == {"requests": 1, "responses": 1}   # never saw the dropped one
    assert d.meter(y) == {"requests": 2, "responses": 2}   # answered both
    assert w.rows(x, sx) == w.expected_rows(x, sx) and w.rows(y, sy) == w.expected_rows(y, sy)
    w.record("drop a request / drop a response", "test_dropped_request_and_response_are_resent",
             d, f"a delay: the head-end re-sent after budget + 1 s "
             f"({BUDGET['B'] + 1} s here), the re-send was answered",
             "head-end re-sends unanswered requests (retries)",
             latency_s={"request dropped": round(hx.latency[x], 1),
                        "response dropped": round(hy.latency[y], 1)})


@mosquitto_only
def test_delays(world: World) -> None:
    """A response delayed within the budget is stored late; a request
    delayed past its deadline is answered 'expired' by the meter, and the
    read stores nothing (the collector re-reads such a range later)."""
    w = world
    x = 1003
    hold = Holder(lambda m, e: m == x)
    w.dap.uplink_hook = hold.uplink
    spec = w.fresh()
    s0 = w.snap()
    h = w.he.read(x, spec)
    assert hold.full.wait(WAIT)
    time.sleep(2.0)  # the attacker's delay
    w.dap.send_bundle([hold.held[0][1]])
    assert h.wait(WAIT) == {x: "answered"}
    assert h.latency[x] >= 2.0  # it could not arrive before the DAP let it go
    assert w.rows(x, spec) == w.expected_rows(x, spec)
    latency = h.latency[x]
    # past the deadline, with no re-send
    w.he.retries = 0
    try:
        hold = Holder(forwards_for(x))
        w.dap.request_hook = hold.request
        late = w.fresh()
        h2 = w.he.read(x, late)
        assert h2.wait(WAIT) == {x: "timeout"}
        w.dap.relay_request(hold.held[0][1])
        wait_until(lambda: w.status(h2, x) == "expired", WAIT, "the meter's 'expired' status")
    finally:
        w.he.retries = 2
    d = w.delta(s0)
    assert d.he == {}
    assert w.rows(x, late) == set()
    assert d.meter(x) == {"requests": 2, "responses": 2}
    w.record("delay a response (within the budget) / a request (past its deadline)",
             "test_delays", d, f"a delay (response stored {latency:.1f} s after the read); "
             "a request held past its deadline is answered 'expired': nothing stored, a gap",
             "deadline inside the sealed request; gap detection re-reads")


@mosquitto_only
def test_late_copy_of_an_answered_request_leaves_it_answered(world: World) -> None:
    """The DAP holds a request until the head-end's re-send has been
    answered, then delivers the held copy: past its deadline, so the meter
    answers 'expired'. The readings are intact; the request log must still
    say 'answered'."""
    w = world
    x = 1002
    hold = Holder(forwards_for(x))
    w.dap.request_hook = hold.request
    spec = w.fresh()
    h = w.he.read(x, spec)
    assert h.wait(WAIT) == {x: "answered"} and w.attempts(h, x) == 2
    s0 = w.snap()
    w.dap.relay_request(hold.held[0][1])
    w.read(x, w.fresh())  # the answer to the late copy has been ingested
    d = w.delta(s0)
    assert d.he == {} and d.meter(x) == {"requests": 2, "responses": 2}
    assert w.rows(x, spec) == w.expected_rows(x, spec)
    status = w.status(h, x)
    w.record("hold a request, deliver it after the head-end's re-send was answered",
             "test_late_copy_of_an_answered_request_leaves_it_answered", d,
             f"readings intact; the request log says {status!r}",
             "a late status never overwrites an answered request")
    assert status == "answered"


@mosquitto_only
def test_dropped_interval_part_is_a_gap_and_is_reread(world: World) -> None:
    """The head-end's own collector, with a fast policy and no re-sends:
    the DAP drops the first part of a meter's multi-part collection
    response (it picks it by size, which it can see). The rest is stored,
    the read times out as partial, the collector finds the hole and
    re-reads exactly that range ("gap"), which the DAP now relays."""
    w = world
    x = 1004
    w.stop_headend()
    he = w.start_headend(retries=0, budget=BUDGET,
                         collect=CollectPolicy(every=1.0, settle=0, backfill=2 * 86400,
                                               backoff=1.0, max_span=2 * 86400, tolerance=0))
    try:
        big = Holder(lambda m, e: m == x and len(e) > 200)
        w.dap.uplink_hook = big.uplink
        s0 = w.snap()
        w.fleet.reboot(x)  # a new session: its birth starts collection for x
        assert big.full.wait(WAIT)
        wait_until(lambda: he.collect_reads.get("gap"), WAIT, "a gap re-read")
        since = w.store.collection(x)[0]

        def complete() -> bool:
            until = int(time.time()) // P * P
            return w.store.interval_starts(x, since, until) == list(range(since, until, P))

        wait_until(complete, WAIT, "the collected profile to be complete")
        spec = ReadSpec("interval", since, int(time.time()) // P * P)
        assert w.rows(x, spec) >= {r for r in w.expected_rows(x, spec)
                                   if r[0] in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT)}
        reads = dict(he.collect_reads)
        d = w.delta(s0)
        reqs = list(w.store.db.execute(
            "SELECT range_from, range_to, status FROM requests WHERE meter = ? AND "
            "issued_at >= ? ORDER BY issued_at", (x, s0.at)))
        statuses = [st for _, _, st in reqs]
        # the referee's view of the dropped part: which rows it carried
        _, _, body = w.inner(x, big.held[0][1])
        dropped = (body[3], body[3] + len(body[7]) * body[4])
    finally:
        w.stop_headend()
        w.start_headend()
    # every registered meter is collected; for x: one routine read, then the hole
    assert reads.get("collect", 0) >= 1 and reads.get("gap", 0) >= 1, reads
    # the collector leaves a meter alone while a read of it is in flight:
    # once the first read is over (partial: a part never came), it re-reads
    # exactly the hole. (An interval that closes meanwhile is collected by
    # a read of its own, which starts where the first read ended.)
    first_to = reqs[0][1]
    assert statuses[0] in ("partial", "timeout")
    assert [(a, b, st) for a, b, st in reqs[1:] if a < first_to] == [(*dropped, "answered")]
    assert d.db == {}
    w.record("drop one part of a multi-part interval response",
             "test_dropped_interval_part_is_a_gap_and_is_reread", d,
             "a delay until the gap re-read; the other parts were stored at once",
             "collector: gap detection and re-read", collect_reads=reads,
             request_statuses=statuses, dropped_range=dropped,
             reads=[(a, b) for a, b, _ in reqs])


# -- births, deaths, foreign traffic (Mosquitto only) ---------------------------------------


def reboot_holding(w: World, x: int) -> tuple[int, bytes, bytes]:
    """Power-cycle meter x while the DAP holds its next two uplinks: the
    broker's publication of the old session's last will, and the new
    session's birth (in whichever order they come). Returns (old session,
    will, birth), neither yet seen by the head-end."""
    session = w.store.meter(x).session
    hold = Holder(lambda m, e: m == x, n=2)
    w.dap.uplink_hook = hold.uplink
    w.fleet.reboot(x)
    assert hold.full.wait(WAIT)
    w.dap.uplink_hook = None
    found = {}
    for _, env in hold.held:
        mtype, _, body = w.inner(x, env)
        found[mtype] = (body[0], env)
    assert found[T_DEATH][0] == session and found[T_BIRTH][0] == session + 1
    return session, found[T_DEATH][1], found[T_BIRTH][1]


def reconnect(w: World, x: int) -> tuple[int, bytes, bytes]:
    """reboot_holding(), then relay the will and the birth one at a time,
    each once the head-end has handled the one before."""
    session, will, birth = reboot_holding(w, x)
    w.dap.send_bundle([will])
    wait_until(lambda: not w.store.online()[x], WAIT, "the will to mark the meter offline")
    w.dap.send_bundle([birth])
    wait_until(lambda: w.store.meter(x).session == session + 1 and w.store.online()[x], WAIT,
               "the new session's birth")
    return session, will, birth


@mosquitto_only
def test_replayed_will_and_birth_after_a_reconnect(world: World) -> None:
    """After a meter reconnects, the DAP replays the previous session's last
    will (to mark it offline) and the birth (to open a session again)."""
    w = world
    x = 1001
    session, will, birth = reconnect(w, x)
    s0 = w.snap()
    w.dap.send_bundle([will])
    w.dap.send_bundle([birth])
    w.read(x, w.fresh())
    d = w.delta(s0)
    assert d.he == {"stale": 1, "duplicate": 1}
    assert w.store.online()[x] and w.store.meter(x).session == session + 1
    w.record("replay the last will of the previous session / the birth",
             "test_replayed_will_and_birth_after_a_reconnect", d,
             "nothing: the meter stays online in its current session",
             "the birth names the session and its will's counter; replay window")


@mosquitto_only
def test_will_then_birth_in_one_bundle_leaves_the_meter_online(world: World) -> None:
    """Both genuine, in the order they happened, in one bundle: a DAP can do
    this on purpose (hold the will until the birth comes); it also happens
    by itself whenever both land in one ingest batch."""
    w = world
    x = 1002
    session, will, birth = reboot_holding(w, x)
    s0 = w.snap()
    try:
        w.dap.send_bundle([will, birth])
        w.read(x, w.fresh())
        d = w.delta(s0)
        assert d.he == {}  # both genuine, both accepted
        assert w.store.meter(x).session == session + 1
        online = w.store.online()[x]
        w.record("hold a meter's last will and send it with the new birth in one bundle",
                 "test_will_then_birth_in_one_bundle_leaves_the_meter_online", d,
                 f"meter marked {'online' if online else 'OFFLINE'} in its new session",
                 "the head-end applies births and deaths in the order they came")
        assert online, "the meter is online in its new session, but the head-end says offline"
    finally:
        reconnect(w, x)  # leave it online for the tests after this one


@mosquitto_only
def test_foreign_bundles_and_envelopes_are_rejected(world: World) -> None:
    """A bundle claiming to come from another DAP; a genuine envelope of a
    meter that is not behind this DAP (say, recorded elsewhere); and a
    bundle published on another DAP's topic, which the broker's ACL drops."""
    w = world
    w.read(DIRECT, CUR)
    with w._lock:
        foreign = [e for m, e in w.responses if m == DIRECT][-1]
    own = w.dap.uplinks_of(1002)[-1]
    s0 = w.snap()
    w.dap.send_bundle([own], dap=2)                       # dap field says 2, on d1/up
    w.dap.send_bundle([foreign])                          # a flow-A meter's envelope via d1
    w.dap.send_bundle([own], topic=topics.dap_up(2))      # not d1's topic: ACL
    w.dap.send_raw_up(b"\x00garbage")                     # canary after the forbidden one
    wait_until(lambda: w.delta(s0).he.get("malformed"), WAIT, "the canary")
    w.read(1002, w.fresh())
    d = w.delta(s0)
    assert d.he == {"mismatch": 2, "malformed": 1}
    w.record("send a bundle as another DAP / relay a foreign meter's envelope / publish on "
             "another DAP's topic", "test_foreign_bundles_and_envelopes_are_rejected", d,
             "nothing", "bundle's DAP id = topic; path check (meter registered behind this "
             "DAP); broker ACL (d1 may publish only d1/up)")


# -- what the DAP does learn ---------------------------------------------------------------------


@mosquitto_only
def test_what_the_dap_learns(world: World) -> None:
    """Metadata, yes: topics, meter ids, sizes, timing, group membership and
    the group request in clear. Readings, no: nothing the meters measured
    appears in any byte the DAP handled."""
    w = world
    t0 = time.time()
    h = w.he.read_group(GROUP, CUR, "fanout")
    assert h.wait(WAIT) == {m: "answered" for m in METERS}
    for m in METERS:
        w.read(m, w.fresh(6))
    seen = w.dap.seen_snapshot()
    by_topic: dict[str, list[int]] = {}
    for s in seen:
        by_topic.setdefault(s.topic, []).append(s.size)
    meters_seen = {topics.parse(t)[1] for t in by_topic if t.endswith("/up")} - {None}
    assert meters_seen == set(METERS)
    groups = {}
    bodies = []
    for p in w.dap.group_requests(t0):
        _, gid, _, body, entries = decode_group(p)
        groups[gid] = sorted(m for m, _ in entries)
        bodies.append(cbor2.loads(body))
    assert groups == {GROUP: list(METERS)}
    # the group body in clear: version, group, direction, type, counter, reqid, deadline, tol
    assert all(b[2] == DOWN and b[3] in messages.DOWNLINK for b in bodies)
    # timing: a meter's turnaround is the gap between a delivery and its next uplink
    turnaround = []
    with w.dap._lock:
        downs = [(t, topics.parse(tp)[1]) for t, tp, _ in w.dap.deliveries if t >= t0]
        ups = [(t, m) for t, m, _ in w.dap.uplinks if t >= t0]
    for t, m in downs:
        after = [u for u, um in ups if um == m and u >= t]
        if after:
            turnaround.append(min(after) - t)
    assert len(turnaround) >= len(METERS)
    # sizes: the referee opens what the DAP saw, to show what a size gives away
    sizes: dict[str, set[int]] = {}
    here: dict[str, set[int]] = {}
    names = {1: "birth", 2: "death", 3: "current", 4: "interval", 5: "status"}
    for t, m, env in list(w.dap.uplinks):
        kind = names[w.inner(m, env)[0]]
        sizes.setdefault(kind, set()).add(len(env))
        if t >= t0:
            here.setdefault(kind, set()).add(len(env))
    # what was read shows in the size: here every current reading is shorter
    # than every 6-hour interval response
    assert max(here["current"]) < min(here["interval"])
    # ... but not what was measured: every reading is exactly as long as the
    # same message with each register at 2**32 - 1, each interval row at
    # 65,535 Wh and every row flagged (the padding, docs/protocol.md §4.2),
    # whatever its values
    powers, padded = set(), 0
    for _, m, env in list(w.dap.uplinks):
        mtype, ctr, body = w.inner(m, env)
        if mtype == T_CURRENT:
            powers.add(dict(zip(body[2][0::2], body[2][1::2]))[obis.POWER])
            widest = body[:2] + [[x if i % 2 == 0 else MAX_U32 for i, x in enumerate(body[2])]]
        elif mtype == T_INTERVAL:
            rows = len(body[7])
            widest = body[:5] + [MAX_U32, MAX_U32, [0xFFFF] * rows, [0xFFFF] * rows,
                                 [x for r in range(rows) for x in (r, 0xF)]]
        else:
            continue
        inner = cbor2.dumps([VERSION, m, UP, mtype, ctr] + widest)
        assert len(env) == ENV_HEADER + MAC_BYTES + len(inner)
        padded += 1
    # readings that differ, lengths that do not
    assert padded >= 2 * len(METERS) and len(powers) > 1
    up_sizes = sorted({n for t, sizes in by_topic.items() if t.endswith("/up") for n in sizes})
    captured = [e for _, _, e in w.dap.uplinks] + [p for _, p in w.dap.requests] + \
        [p for _, _, p in w.dap.deliveries]
    patterns = plaintext_patterns(w.store, list(METERS))
    assert len(patterns) >= 20
    assert scan(patterns, patterns) >= len(patterns)     # the scanner finds them in clear
    found = scan(captured, patterns)
    assert found == 0
    OBSERVED.append({"attack": "observe", "test": "test_what_the_dap_learns",
                     "broker": w.kind, "topics": len(by_topic), "meters_seen": sorted(meters_seen),
                     "uplink_sizes": [up_sizes[0], up_sizes[-1]], "messages": len(seen),
                     "sizes_by_type": {k: [min(v), max(v)] for k, v in sizes.items()},
                     "readings_padded": padded, "distinct_power_values": len(powers),
                     "groups": groups, "group_body_example": bodies[-1],
                     "plaintext_patterns": len(patterns), "plaintext_found": found,
                     "turnaround_ms_median": round(1000 * sorted(turnaround)[len(turnaround) // 2],
                                                   1),
                     "bytes_scanned": sum(len(c) for c in captured)})
